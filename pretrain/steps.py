"""Pure functions of the masked-LM run: state init, the train step, the eval step.

Everything random is derived from (seed, step[, micro-batch]) inside the step, so a
resumed run repeats exactly the computation an uninterrupted one would have done.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from models.bert import BertForMaskedLM
from pretrain.masking import MaskingConfig, mask_tokens, mlm_loss_terms
from text.tokenizer import PAD_ID


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def init_state(rng: jax.Array, model: BertForMaskedLM, tx: optax.GradientTransformation,
               seq_len: int) -> TrainState:
    """Fresh state; parameters keep their `nn.Partitioned` boxes (logical axis names), and
    the optimizer moments inherit them, so one spec lookup shards the whole state."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(rng, ids, jnp.zeros((1, 1), jnp.int32))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def masked_inputs(rng: jax.Array, batch: dict, masking: MaskingConfig,
                  word_starts: jax.Array | None) -> dict:
    """The model's inputs and targets for a batch of packed token ids."""
    masked = mask_tokens(rng, batch['input_ids'], masking, word_starts)
    masked['attention_mask'] = (batch['input_ids'] != PAD_ID).astype(jnp.int32)
    masked['segment_ids'] = batch['segment_ids']
    return masked


def _forward_terms(params, inputs, dropout_rng, *, model, deterministic):
    """Runs the model on masked inputs and returns the loss sums."""
    logits = model.apply(
        {'params': params}, inputs['input_ids'], inputs['masked_positions'],
        attention_mask=inputs['attention_mask'], segment_ids=inputs['segment_ids'],
        deterministic=deterministic, rngs={'dropout': dropout_rng})
    terms = mlm_loss_terms(logits, inputs['masked_labels'], inputs['masked_weights'])
    return terms['loss_sum'], terms


def _micro_batches(batch: dict, count: int) -> dict:
    """(B, L) -> (count, B/count, L), row i of every device's shard to micro-batch i % count,
    so the split needs no data movement between devices."""
    def split(x):
        x = x.reshape(x.shape[0] // count, count, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, *, model: BertForMaskedLM,
               tx: optax.GradientTransformation, schedule: Callable, masking: MaskingConfig,
               word_starts: jax.Array | None, seed: int,
               grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One optimizer step on the global batch. The whole batch is masked first, then
    gradients are summed over micro-batches and divided by the number of predicted tokens:
    without dropout, accumulation changes memory use, not the result."""
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    mask_rng, dropout_rng = jax.random.split(rng)
    inputs = masked_inputs(mask_rng, batch, masking, word_starts)
    forward = functools.partial(_forward_terms, model=model, deterministic=False)
    grad_fn = jax.value_and_grad(forward, has_aux=True)

    def micro_step(carry, xs):
        micro, index = xs
        (_, terms), grads = grad_fn(state.params, micro, jax.random.fold_in(dropout_rng, index))
        return jax.tree.map(jnp.add, carry, (grads, terms)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    terms0 = {k: jnp.zeros((), jnp.float32) for k in ('loss_sum', 'correct_sum', 'weight_sum')}
    micro = _micro_batches(inputs, grad_accum_steps)
    (grads, terms), _ = jax.lax.scan(micro_step, (zeros, terms0),
                                     (micro, jnp.arange(grad_accum_steps)))
    grads = jax.tree.map(lambda g: g / jnp.maximum(terms['weight_sum'], 1.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state)
    metrics = {**terms, 'grad_norm': optax.tree.norm(grads),
               'learning_rate': schedule(state.step)}
    return new_state, metrics


def eval_step(params: Any, batch: dict, index: jax.Array, *, model: BertForMaskedLM,
              masking: MaskingConfig, word_starts: jax.Array | None, seed: int) -> dict:
    """Loss sums on one held-out batch; masking depends only on (seed, batch index), so
    every evaluation of a run scores the same predictions."""
    rng = jax.random.fold_in(jax.random.key(seed + 1_000_003), index)
    inputs = masked_inputs(rng, batch, masking, word_starts)
    _, terms = _forward_terms(params, inputs, rng, model=model, deterministic=True)
    return terms

