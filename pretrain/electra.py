"""The ELECTRA objective (`objective='electra'`): its loss as a stage loss_fn of the shared
engine/step.py train_step, its eval step and its logged metrics.

Per step: the batch is masked as for MLM; the generator predicts the masked tokens (MLM
loss); a token is sampled from its softmax at every masked slot (with the step's key, under
stop_gradient: no gradient flows through sampling); the discriminator reads the original
sequence with the samples in place and predicts, for every real (non-pad) token, whether it
was replaced (a sample equal to the original counts as original, as in ELECTRA). Loss =
generator MLM loss (mean over masked tokens) + disc_weight x discriminator BCE (mean over
real tokens), both models trained together.

The engine divides the summed objective by the summed `weight_sum` (masked tokens). So
that this stays exact under gradient accumulation, the BCE of each token is scaled by
(masked / real tokens) of the whole global batch, computed before micro-batching.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from engine import step as step_lib
from engine.loop import summarize_sums
from models.electra import ElectraForPretraining
from pretrain.masking import MaskingConfig, mlm_loss_terms
from pretrain.steps import masked_inputs
from text.tokenizer import PAD_ID


def _with_bce_scale(inputs: dict, original: jax.Array) -> dict:
    """Adds the original ids and each row's copy of the global masked/real token ratio."""
    real = (original != PAD_ID).sum()
    scale = inputs['masked_weights'].sum() / jnp.maximum(real, 1)
    return {**inputs, 'original_ids': original,
            'bce_scale': jnp.full(original.shape[:1], scale, jnp.float32)}


def electra_terms(params: Any, inputs: dict, rng: jax.Array, *, model: ElectraForPretraining,
                  disc_weight: float, deterministic: bool) -> tuple[jax.Array, dict]:
    """(objective sum, loss terms) of one (micro-)batch; see the module doc."""
    gen_rng, sample_rng, disc_rng = jax.random.split(rng, 3)
    mask, segments = inputs['attention_mask'], inputs['segment_ids']
    positions, weights = inputs['masked_positions'], inputs['masked_weights']
    gen_logits = model.apply({'params': params}, inputs['input_ids'], positions, mask, segments,
                             deterministic, method='generate', rngs={'dropout': gen_rng})
    mlm = mlm_loss_terms(gen_logits, inputs['masked_labels'], weights)
    sampled = jax.random.categorical(sample_rng, jax.lax.stop_gradient(gen_logits))
    original = inputs['original_ids']
    at_slots = jnp.take_along_axis(original, positions, axis=-1)
    sampled = jnp.where(weights > 0, sampled, at_slots).astype(original.dtype)
    rows = jnp.arange(original.shape[0])[:, None]
    disc_ids = original.at[rows, positions].set(sampled)
    replaced = (disc_ids != original).astype(jnp.float32)
    disc_logits = model.apply({'params': params}, disc_ids, mask, segments, deterministic,
                              method='discriminate', rngs={'dropout': disc_rng})
    real = mask.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(disc_logits, replaced) * real
    correct = ((disc_logits > 0) == (replaced > 0)).astype(jnp.float32) * real
    scaled_bce = (bce * inputs['bce_scale'][:, None]).sum()
    objective = mlm['loss_sum'] + disc_weight * scaled_bce
    terms = {'loss_sum': objective, 'correct_sum': mlm['correct_sum'],
             'weight_sum': mlm['weight_sum'], 'gen_loss_sum': mlm['loss_sum'],
             'disc_loss_sum': bce.sum(), 'disc_correct_sum': correct.sum(),
             'disc_replaced_sum': replaced.sum(), 'disc_weight_sum': real.sum()}
    return objective, terms


def electra_train_step(*, model: ElectraForPretraining, tx: optax.GradientTransformation,
                       schedule: Callable, masking: MaskingConfig,
                       word_starts: jax.Array | None, seed: int, disc_weight: float,
                       grad_accum_steps: int = 1) -> Callable:
    """engine.step.train_step with the ELECTRA loss: (state, batch) -> (state, metrics).
    Keys as the MLM step: masking from the step's key, then the loss's key (dropout and
    sampling) fold_in(key, micro-batch)."""
    def prepare(batch, rng):
        mask_rng, loss_rng = jax.random.split(rng)
        if grad_accum_steps == 1:
            loss_rng = jax.random.fold_in(loss_rng, 0)
        inputs = masked_inputs(mask_rng, batch, masking, word_starts)
        return _with_bce_scale(inputs, batch['input_ids']), loss_rng

    loss = functools.partial(electra_terms, model=model, disc_weight=disc_weight,
                             deterministic=False)
    return functools.partial(step_lib.train_step, loss_fn=loss, tx=tx, schedule=schedule,
                             seed=seed, prepare=prepare, grad_accum_steps=grad_accum_steps,
                             per_weight=True)


def eval_step(params: Any, batch: dict, index: jax.Array, *, model: ElectraForPretraining,
              masking: MaskingConfig, word_starts: jax.Array | None, seed: int,
              disc_weight: float) -> dict:
    """Loss sums on one held-out batch; masking and sampling depend only on (seed, index).
    `loss_sum` is the generator's MLM loss (comparable with an MLM run's eval_loss)."""
    rng = jax.random.fold_in(jax.random.key(seed + 1_000_003), index)
    inputs = _with_bce_scale(masked_inputs(rng, batch, masking, word_starts),
                             batch['input_ids'])
    _, terms = electra_terms(params, inputs, rng, model=model, disc_weight=disc_weight,
                             deterministic=True)
    return {**terms, 'loss_sum': terms['gen_loss_sum']}


def _ratio(records: list[dict], key: str, weight_key: str) -> float:
    weight = max(sum(float(r[weight_key]) for r in records), 1.0)
    return sum(float(r[key]) for r in records) / weight


def summarize(records: list[dict]) -> dict:
    """A log interval's metrics: `loss` (the total objective), `mlm_accuracy` and
    `generator_loss` of the generator, `disc_loss`, `disc_accuracy` and `replaced_fraction`
    (of real tokens) of the discriminator."""
    out = summarize_sums(records, accuracy_key='mlm_accuracy')
    out['generator_loss'] = _ratio(records, 'gen_loss_sum', 'weight_sum')
    out.update(disc_metrics(records, prefix=''))
    return out


def disc_metrics(sums: list[dict], prefix: str = 'eval_') -> dict:
    """The discriminator's means of summed terms."""
    return {f'{prefix}disc_loss': _ratio(sums, 'disc_loss_sum', 'disc_weight_sum'),
            f'{prefix}disc_accuracy': _ratio(sums, 'disc_correct_sum', 'disc_weight_sum'),
            f'{prefix}replaced_fraction': _ratio(sums, 'disc_replaced_sum', 'disc_weight_sum')}
