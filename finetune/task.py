"""The task a fine-tuning config names: its data files, columns, split and seed."""

import ml_collections

from finetune import data, embed_data, span_tasks


def load_config_task(cfg: ml_collections.ConfigDict, max_train_examples: int = 0) -> dict:
    """data.load_task on the files, columns, split and seed `cfg.data` names."""
    d = cfg.data
    if cfg.task == 'embedding':  # (anchor, positive) pairs
        return embed_data.load_embedding_task(cfg)
    if span_tasks.handles(cfg.task):  # words with tags, or questions with answer spans
        return span_tasks.load_task(cfg, max_train_examples)
    return data.load_task(d.train_file, d.validation_file, d.test_file,
                          text_column=d.text_column, text_b_column=d.text_b_column,
                          label_column=d.label_column, task=cfg.task,
                          validation_fraction=d.validation_fraction, seed=cfg.seed,
                          max_train_examples=max_train_examples)
