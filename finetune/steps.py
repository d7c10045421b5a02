"""Pure functions of a fine-tuning run: the train step and the prediction step.

Inside the step, parameters are split by their static labels into `trainable` (the only
argument differentiated) and `frozen` (constants): frozen gradients are never computed,
and frozen values are passed through untouched, so they stay bit-identical.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from finetune import distill as distill_lib
from finetune.freeze import merge_params, split_params
from models.bert import BertForSequenceClassification


@flax.struct.dataclass
class FinetuneState:
    step: jax.Array
    params: Any
    opt_state: Any


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


def train_step(state: FinetuneState, batch: dict, *, model: BertForSequenceClassification,
               tx: optax.GradientTransformation, labels: dict, schedule: Callable, task: str,
               seed: int, distill: tuple[float, float] | None = None
               ) -> tuple[FinetuneState, dict]:
    """One optimizer step; `labels` ('train'/'frozen' per leaf) is static. `distill` =
    (temperature, alpha): the loss also fits batch['teacher_logits'] (finetune/distill.py)."""
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    weights = jnp.ones(batch['labels'].shape[0], jnp.float32)
    trainable, frozen = split_params(state.params, labels)

    def loss_fn(trainable):
        logits = _apply(model, merge_params(trainable, frozen), batch, deterministic=False,
                        rng=rng)
        losses = None if distill is None else distill_lib.distillation_losses(
            logits, batch['teacher_logits'], batch['labels'], *distill)
        terms = loss_terms(logits, batch['labels'], weights, task, losses)
        return terms['loss_sum'] / terms['weight_sum'], terms

    grads, terms = jax.grad(loss_fn, has_aux=True)(trainable)
    # Placeholders where the optimizer's frozen branch (set_to_zero) expects gradients.
    full_grads = merge_params(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    trainable = optax.apply_updates(trainable, split_params(updates, labels)[0])
    new_state = state.replace(step=state.step + 1, opt_state=opt_state,
                              params=merge_params(trainable, frozen))
    metrics = {**terms, 'grad_norm': optax.tree.norm(grads), 'learning_rate': schedule(state.step)}
    return new_state, metrics


def predict_step(params: Any, batch: dict, *, model: BertForSequenceClassification,
                 task: str) -> jax.Array:
    """Class probabilities (N, C), or regression outputs (N, 1)."""
    logits = _apply(model, params, batch, deterministic=True)
    return logits if task == 'regression' else jax.nn.softmax(logits, axis=-1)

