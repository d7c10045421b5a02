"""`launch.py predict`: class probabilities of a fine-tuned run's best checkpoint, as JSONL.

Input: a text file (one text a line), or CSV/TSV/JSONL with the run's text column(s).
Output: one JSON object per input row: {"text", ["text_b"], "label", "probabilities"}
(or {"text", "prediction"} for regression), to stdout or --output.
"""

import json
import sys

import jax
import numpy as np
from etils import epath

from engine.checkpoint import read_state_numpy
from engine.config_cli import ConfigError, config_from_json
from engine.paths import absolute_path, local_file_argument
from finetune import data
from models.bert import BertConfig, BertForSequenceClassification
from models.peft import merge_lora, merged_config
from text.tokenizer import MODEL_FILENAME, load_tokenizer, tokenizer_file

BATCH_SIZE = 64


def read_inputs(path: str, cfg) -> tuple[list[str], list[str] | None]:
    """Texts (and second texts for pair tasks) from a .txt, .csv, .tsv or .jsonl file."""
    file = epath.Path(path)
    if not file.is_file():
        raise ConfigError(f'--input: no such file {path!r}')
    if file.suffix in ('.csv', '.tsv', '.jsonl', '.json'):
        rows = data.read_examples(path, text_column=cfg.data.text_column,
                                  text_b_column=cfg.data.text_b_column,
                                  label_column='', task=cfg.task)
        texts_b = [r['text_b'] for r in rows] if cfg.data.text_b_column else None
        return [r['text_a'] for r in rows], texts_b
    lines = [line.strip() for line in file.read_text(encoding='utf-8').splitlines()]
    return [line for line in lines if line], None


def check_finished_run(workdir: epath.Path, key: str = '--workdir') -> None:
    """A one-line ConfigError naming `key` unless `workdir` holds what `load_run` reads."""
    for name in ('config.json', 'model.json', 'task.json', 'best'):
        if not (workdir / name).exists():
            raise ConfigError(f'{key}: {workdir} has no {name}; is it a finished '
                              'fine-tuning run?')
    if tokenizer_file(str(workdir)) is None:
        raise ConfigError(f'{key}: {workdir} has no {MODEL_FILENAME}; is it a finished '
                          'fine-tuning run?')


def load_run(workdir: epath.Path):
    """(config, model, params, label names) of a fine-tuning workdir's best checkpoint."""
    check_finished_run(workdir)
    cfg = config_from_json((workdir / 'config.json').read_text())
    model_cfg = BertConfig(**json.loads((workdir / 'model.json').read_text()))
    params = read_state_numpy(str(workdir / 'best'))['params']
    # LoRA folds into the kernels: the plain architecture (plus any adapters) predicts alike.
    params, model_cfg = merge_lora(params, model_cfg), merged_config(model_cfg)
    model = BertForSequenceClassification(model_cfg)
    label_names = json.loads((workdir / 'task.json').read_text())['label_names']
    return cfg, model, params, label_names


def encode_for_run(run_cfg, workdir: epath.Path, examples: data.Examples) -> dict:
    """`examples` encoded as the run in `workdir` saw its inputs: its tokenizer, seq_len."""
    return data.encode(load_tokenizer(tokenizer_file(str(workdir))), examples, run_cfg.seq_len)


def logits_fn(model):
    """jitted (params, eval batch) -> eval-mode logits."""
    return jax.jit(lambda p, b: model.apply({'params': p}, b['input_ids'],
                                            token_type_ids=b['token_type_ids'],
                                            attention_mask=b['attention_mask']))


def predict(model, params, encoded: dict, task: str) -> np.ndarray:
    """Probabilities (N, C), or regression outputs (N,), in input order."""
    apply = logits_fn(model)
    outputs = []
    for batch in data.eval_batches(encoded, BATCH_SIZE):
        logits = np.asarray(apply(params, batch))[batch['weights'] > 0]
        outputs.append(logits[:, 0] if task == 'regression' else _softmax(logits))
    return np.concatenate(outputs)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def run(workdir: str, input_path: str, output_path: str = '') -> None:
    local_file_argument(input_path, '--input', 'predict')
    if output_path:
        local_file_argument(output_path, '--output', 'predict')
    workdir = absolute_path(workdir)
    cfg, model, params, label_names = load_run(workdir)
    texts, texts_b = read_inputs(input_path, cfg)
    examples = data.Examples(text_a=texts, text_b=texts_b,
                             labels=np.zeros(len(texts), np.float32 if cfg.task == 'regression'
                                             else np.int32))
    encoded = encode_for_run(cfg, workdir, examples)
    outputs = predict(model, params, encoded, cfg.task)
    out = open(output_path, 'w') if output_path else sys.stdout
    try:
        for i, text in enumerate(texts):
            record = {'text': text}
            if texts_b is not None:
                record['text_b'] = texts_b[i]
            if cfg.task == 'regression':
                record['prediction'] = float(outputs[i])
            else:
                record['label'] = label_names[int(outputs[i].argmax())]
                record['probabilities'] = {n: round(float(p), 6)
                                           for n, p in zip(label_names, outputs[i], strict=True)}
            out.write(json.dumps(record) + '\n')
    finally:
        if output_path:
            out.close()
