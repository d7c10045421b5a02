"""The per-token fine-tuning tasks inside the one fine-tuning run (finetune/train.py):
task=token_classification (finetune/tokens.py) and task=extractive_qa (finetune/qa.py).

Each gives the run its data, encoding, head (models/heads.py), loss, and validation
metrics (finetune/span_metrics.py); restore, freezing, layer-wise rates, PEFT, the train
step, checkpoints and the best-checkpoint logic are the classifier's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from engine import mesh as mesh_lib
from engine import step as step_lib
from engine.errors import ConfigError
from finetune import encoding, qa, span_metrics, tokens
from models.heads import BertForQuestionAnswering, BertForTokenClassification

TOKENS, QA = 'token_classification', 'extractive_qa'
TASKS = (TOKENS, QA)
METRICS = {TOKENS: ('f1', 'precision', 'recall', 'accuracy'), QA: ('f1', 'exact_match')}


def handles(task: str) -> bool:
    return task in TASKS


def check(cfg: ml_collections.ConfigDict) -> None:
    """One-line ConfigErrors for what these tasks cannot combine with."""
    if cfg.metric not in METRICS[cfg.task]:
        raise ConfigError(f'metric: {cfg.metric!r}: task={cfg.task} reports '
                          f'{list(METRICS[cfg.task])}')
    augment = cfg.get('augment')
    if augment is not None and any(float(augment[k]) for k in ('delete', 'swap', 'mask')):
        raise ConfigError(f'augment: task={cfg.task} cannot augment tokens (labels and '
                          'answer spans are per token)')
    if cfg.get('distill') is not None and cfg.distill.teacher:
        raise ConfigError(f'distill.teacher: task={cfg.task} is not supported')
    d = cfg.data
    if d.get('doc_stride', 0) < 0 or d.get('max_answer_length', 1) < 1:
        raise ConfigError('data.doc_stride must be >= 0 (0 = auto) and data.max_answer_length'
                          ' >= 1')


def load_task(cfg: ml_collections.ConfigDict, max_train_examples: int = 0) -> dict:
    d = cfg.data
    module = tokens if cfg.task == TOKENS else qa
    return module.load_task(d.train_file, d.validation_file, d.test_file,
                            validation_fraction=d.validation_fraction, seed=cfg.seed,
                            max_train_examples=max_train_examples)


def encode(cfg: ml_collections.ConfigDict, tokenizer, examples, label_names
           ) -> dict[str, np.ndarray]:
    if cfg.task == TOKENS:
        return tokens.encode(tokenizer, examples, cfg.seq_len, label_names)
    return qa.encode(tokenizer, examples, cfg.seq_len, cfg.data.get('doc_stride', 0))


def model_class(task: str) -> type:
    return BertForTokenClassification if task == TOKENS else BertForQuestionAnswering


def num_outputs(task: str, label_names) -> int:
    return len(label_names) if task == TOKENS else 2


def abstract_targets(cfg: ml_collections.ConfigDict, sharding) -> dict:
    """The training targets of one global batch as ShapeDtypeStructs (for a dry run)."""
    if cfg.task == TOKENS:
        return {'labels': jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32,
                                               sharding=sharding)}
    row = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32, sharding=sharding)
    return {'start_positions': row, 'end_positions': row}


# ---------------------------------------------------------------- steps


def _logits(model, params, batch, *, deterministic: bool, rng=None) -> jax.Array:
    return model.apply({'params': params}, batch['input_ids'],
                       token_type_ids=batch['token_type_ids'],
                       attention_mask=batch['attention_mask'], deterministic=deterministic,
                       rngs={'dropout': rng} if rng is not None else None)


def token_loss_terms(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Summed cross-entropy over the labelled positions (labels >= 0), their count and the
    correct ones. `labels` may be longer than the (dynamically padded) logits."""
    labels = labels[:, :logits.shape[1]]
    weights = (labels >= 0).astype(jnp.float32)
    safe = jnp.maximum(labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = (logits.argmax(-1) == safe).astype(jnp.float32)
    return {'loss_sum': (losses * weights).sum(), 'correct_sum': (correct * weights).sum(),
            'weight_sum': weights.sum()}


def qa_loss_terms(logits: jax.Array, starts: jax.Array, ends: jax.Array
                  ) -> dict[str, jax.Array]:
    """The mean of the start and end cross-entropies (BERT's), summed over windows."""
    start = optax.softmax_cross_entropy_with_integer_labels(logits[..., 0], starts)
    end = optax.softmax_cross_entropy_with_integer_labels(logits[..., 1], ends)
    correct = ((logits[..., 0].argmax(-1) == starts) & (logits[..., 1].argmax(-1) == ends))
    return {'loss_sum': ((start + end) / 2).sum(),
            'correct_sum': correct.astype(jnp.float32).sum(),
            'weight_sum': jnp.asarray(starts.shape[0], jnp.float32)}


def train_step(*, model, tx: optax.GradientTransformation, labels: Any, schedule: Callable,
               task: str, seed: int, grad_accum_steps: int = 1) -> Callable:
    """engine.step.train_step with the task's loss: per labelled token (divided by their
    count) for token classification, per window for QA."""
    def loss_fn(params, batch, rng):
        logits = _logits(model, params, batch, deterministic=False, rng=rng)
        if task == TOKENS:
            terms = token_loss_terms(logits, batch['labels'])
            return terms['loss_sum'], terms
        terms = qa_loss_terms(logits, batch['start_positions'], batch['end_positions'])
        return terms['loss_sum'] / terms['weight_sum'], terms

    return functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                             seed=seed, labels=labels, grad_accum_steps=grad_accum_steps,
                             per_weight=task == TOKENS)


def predict_step(params: Any, batch: dict, *, model) -> jax.Array:
    """Eval-mode logits (B, L, C)."""
    return _logits(model, params, batch, deterministic=True)


# ---------------------------------------------------------------- evaluation


def all_logits(apply: Callable, encoded: dict, batch_size: int, *, dynamic_padding: bool,
               local: Callable = lambda b: b) -> np.ndarray:
    """(N, seq_len, C) float32 logits of every encoded row in order, padded positions 0.
    `apply(batch)` -> logits; `local` picks this process's rows of a batch."""
    n, seq_len = encoded['input_ids'].shape
    out = None
    at = 0
    for batch in encoding.eval_batches(encoded, batch_size, dynamic_padding=dynamic_padding):
        keep = batch['weights'] > 0
        logits = np.asarray(jax.device_get(apply(local(
            {k: batch[k] for k in encoding.SEQUENCE_KEYS}))))[keep]
        if out is None:
            out = np.zeros((n, seq_len, logits.shape[-1]), np.float32)
        out[at:at + len(logits), :logits.shape[1]] = logits
        at += len(logits)
    return out


def metrics_of(task: str, logits: np.ndarray, encoded: dict, examples, label_names,
               max_answer_length: int) -> dict:
    if task == TOKENS:
        pred = tokens.word_predictions(logits.argmax(-1), encoded['labels'], examples,
                                       label_names)
        return span_metrics.token_metrics(examples.tags, pred)
    answers = qa.best_spans(logits, encoded, examples, max_answer_length)
    return span_metrics.squad_metrics([a for a, _ in answers], examples.answers)


def evaluate_split(cfg, mesh, predict_fn, params, encoded: dict, examples, label_names
                   ) -> dict:
    """Validation / test metrics of `params` on one encoded split (the run's mesh)."""
    lo, hi = mesh_lib.process_rows(cfg.batch_size, mesh)

    def local(batch):
        return mesh_lib.shard_batch({k: v[lo:hi] for k, v in batch.items()}, mesh)

    logits = all_logits(lambda b: predict_fn(params, b), encoded, cfg.batch_size,
                        dynamic_padding=cfg.data.dynamic_padding, local=local)
    return metrics_of(cfg.task, logits, encoded, examples, label_names,
                      cfg.data.get('max_answer_length', 30))
