"""Pure functions of the masked-LM run: state init, its train step, the eval step.

Everything random is derived from (seed, step[, micro-batch]) inside the step, so a
resumed run repeats exactly the computation an uninterrupted one would have done.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from engine import step as step_lib
from engine.step import TrainState
from models.bert import BertForMaskedLM
from pretrain.masking import MaskingConfig, mask_tokens, mlm_loss_terms
from text.tokenizer import PAD_ID


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


def mlm_train_step(*, model: BertForMaskedLM, tx: optax.GradientTransformation,
                   schedule: Callable, masking: MaskingConfig, word_starts: jax.Array | None,
                   seed: int, grad_accum_steps: int = 1) -> Callable:
    """engine.step.train_step with the masked-LM loss: (state, batch) -> (state, metrics).
    The whole batch is masked first; gradients are summed over micro-batches and divided by
    the number of predicted tokens: without dropout, accumulation changes memory use, not
    the result."""
    def prepare(batch, rng):
        mask_rng, dropout_rng = jax.random.split(rng)
        # Micro-batch i drops out with fold_in(dropout_rng, i); one micro-batch is the i = 0
        # case, so accumulation does not change which units the first rows drop.
        if grad_accum_steps == 1:
            dropout_rng = jax.random.fold_in(dropout_rng, 0)
        return masked_inputs(mask_rng, batch, masking, word_starts), dropout_rng

    loss = functools.partial(_forward_terms, model=model, deterministic=False)
    return functools.partial(step_lib.train_step, loss_fn=loss, tx=tx, schedule=schedule,
                             seed=seed, prepare=prepare, grad_accum_steps=grad_accum_steps,
                             per_weight=True)


def eval_step(params: Any, batch: dict, index: jax.Array, *, model: BertForMaskedLM,
              masking: MaskingConfig, word_starts: jax.Array | None, seed: int) -> dict:
    """Loss sums on one held-out batch; masking depends only on (seed, batch index), so
    every evaluation of a run scores the same predictions."""
    rng = jax.random.fold_in(jax.random.key(seed + 1_000_003), index)
    inputs = masked_inputs(rng, batch, masking, word_starts)
    _, terms = _forward_terms(params, inputs, rng, model=model, deterministic=True)
    return terms

