"""Pure functions of a fine-tuning run: its train step and the prediction step.

The train step is engine.step.train_step with the task loss; parameters are split there by
their static labels into trainable (the only argument differentiated) and frozen (constants).
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from engine import step as step_lib
from finetune import distill as distill_lib
from models.bert import BertForSequenceClassification


def loss_terms(logits: jax.Array, labels: jax.Array, weights: jax.Array, task: str,
               losses: jax.Array | None = None) -> dict[str, jax.Array]:
    """Weighted sums (cross-entropy, or squared error for regression) and correct counts;
    `losses` (per example, e.g. finetune.distill's) replaces the cross-entropy."""
    if task == 'regression':
        errors = (logits[:, 0] - labels.astype(jnp.float32)) ** 2
        correct = jnp.zeros_like(errors)
    else:
        errors = (optax.softmax_cross_entropy_with_integer_labels(logits, labels)
                  if losses is None else losses)
        correct = (logits.argmax(-1) == labels).astype(jnp.float32)
    return {'loss_sum': (errors * weights).sum(), 'correct_sum': (correct * weights).sum(),
            'weight_sum': weights.sum()}


def _apply(model, params, batch, *, deterministic: bool, rng=None) -> jax.Array:
    return model.apply({'params': params}, batch['input_ids'],
                       token_type_ids=batch['token_type_ids'],
                       attention_mask=batch['attention_mask'], deterministic=deterministic,
                       rngs={'dropout': rng} if rng is not None else None)


def classifier_train_step(*, model: BertForSequenceClassification,
                          tx: optax.GradientTransformation, labels: Any, schedule: Callable,
                          task: str, seed: int, distill: tuple[float, float] | None = None,
                          grad_accum_steps: int = 1) -> Callable:
    """engine.step.train_step with the task loss (mean over the batch): (state, batch) ->
    (state, metrics). `labels` ('train'/'frozen' per leaf) is static. `distill` =
    (temperature, alpha): the loss also fits batch['teacher_logits'] (finetune/distill.py)."""
    def loss_fn(params, batch, rng):
        logits = _apply(model, params, batch, deterministic=False, rng=rng)
        weights = jnp.ones(batch['labels'].shape[0], jnp.float32)
        losses = None if distill is None else distill_lib.distillation_losses(
            logits, batch['teacher_logits'], batch['labels'], *distill)
        terms = loss_terms(logits, batch['labels'], weights, task, losses)
        return terms['loss_sum'] / terms['weight_sum'], terms

    return functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                             seed=seed, labels=labels, grad_accum_steps=grad_accum_steps)


def predict_step(params: Any, batch: dict, *, model: BertForSequenceClassification,
                 task: str) -> jax.Array:
    """Class probabilities (N, C), or regression outputs (N, 1)."""
    logits = _apply(model, params, batch, deterministic=True)
    return logits if task == 'regression' else jax.nn.softmax(logits, axis=-1)

