"""The pretraining objective (`objective`: 'mlm' or 'electra') and the masking options that
go with it: which model, train step, eval step, FLOP count and log summary a run uses.

pretrain/train.py asks this module instead of branching itself, so a new objective is one
place to change.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import optax

from engine.errors import ConfigError
from engine.loop import summarize_sums
from models.bert import BertConfig, BertForMaskedLM
from models.electra import ElectraForPretraining, electra_train_flops, generator_config
from models.flops import train_flops_per_step
from pretrain import electra, steps
from pretrain.masking import MaskingConfig

OBJECTIVES = ('mlm', 'electra')


def name(cfg: ml_collections.ConfigDict) -> str:
    """The run's objective ('mlm' for configs written before the key existed)."""
    return cfg.get('objective', 'mlm')


def validate(cfg: ml_collections.ConfigDict, model_cfg: BertConfig) -> None:
    """One-line ConfigErrors for the objective and masking options."""
    k = cfg.masking
    if name(cfg) not in OBJECTIVES:
        raise ConfigError(f'objective: must be one of {OBJECTIVES}, got {name(cfg)!r}')
    eval_rate = k.get('eval_mask_rate', k.mask_rate)
    if not 0 < eval_rate < 1:
        raise ConfigError(f'masking.eval_mask_rate: must be in (0, 1), got {eval_rate}')
    span = k.get('span_length', 0.0)
    if span < 0:
        raise ConfigError(f'masking.span_length: must be >= 0 (0 = off), got {span}')
    if span and k.whole_word:
        raise ConfigError('masking.span_length: span masking and masking.whole_word are '
                          'exclusive; use one')
    if name(cfg) != 'electra':
        return
    e = cfg.electra
    if not e.disc_weight >= 0:
        raise ConfigError(f'electra.disc_weight: must be >= 0, got {e.disc_weight}')
    try:
        generator_config(model_cfg, e.generator_size)
    except ValueError as err:
        raise ConfigError(f'electra.generator_size: {err}') from None
    if cfg.init_from:
        raise ConfigError('objective: electra cannot continue a run (init_from); start it '
                          'fresh, or fine-tune from its workdir')


def eval_masking(cfg: ml_collections.ConfigDict, masking: MaskingConfig) -> MaskingConfig:
    """The held-out evaluation's masking: independent tokens (no spans, so span and token
    runs score the same task) at masking.eval_mask_rate, slots sized from that rate (the
    training ones when both rates are equal, so a default run evaluates as before)."""
    rate = cfg.masking.get('eval_mask_rate', masking.mask_rate)
    slots = masking.max_predictions
    if rate != masking.mask_rate:
        slots = math.ceil(rate * cfg.seq_len)
    return dataclasses.replace(masking, mask_rate=rate, max_predictions=slots, span_length=0.0)


def build_model(cfg: ml_collections.ConfigDict, model_cfg: BertConfig) -> nn.Module:
    """BertForMaskedLM, or ELECTRA's generator + discriminator (discriminator = model_cfg)."""
    if name(cfg) == 'electra':
        return ElectraForPretraining(model_cfg, generator_config(model_cfg,
                                                                 cfg.electra.generator_size))
    return BertForMaskedLM(model_cfg)


def make_train_step(cfg: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, schedule: Callable,
                    masking: MaskingConfig, word_starts: jax.Array | None) -> Callable:
    """(state, batch) -> (state, metrics), not yet jitted."""
    common = dict(model=model, tx=tx, schedule=schedule, masking=masking,
                  word_starts=word_starts, seed=cfg.seed, grad_accum_steps=cfg.grad_accum_steps)
    if name(cfg) == 'electra':
        return electra.electra_train_step(disc_weight=cfg.electra.disc_weight, **common)
    return steps.mlm_train_step(**common)


def make_eval_step(cfg: ml_collections.ConfigDict, model: nn.Module, masking: MaskingConfig,
                   word_starts: jax.Array | None) -> Callable:
    """(params, batch, index) -> summed eval terms, not yet jitted (eval masking)."""
    common = dict(model=model, masking=eval_masking(cfg, masking), word_starts=word_starts,
                  seed=cfg.seed)
    if name(cfg) == 'electra':
        return functools.partial(electra.eval_step, disc_weight=cfg.electra.disc_weight,
                                 **common)
    return functools.partial(steps.eval_step, **common)


def flops_per_step(cfg: ml_collections.ConfigDict, model: nn.Module,
                   max_predictions: int) -> float:
    """Model FLOPs of one training step (both models for ELECTRA)."""
    if name(cfg) == 'electra':
        return electra_train_flops(model.config, model.generator_config, cfg.batch_size,
                                   cfg.seq_len, max_predictions)
    return train_flops_per_step(model.config, cfg.batch_size, cfg.seq_len, max_predictions)


def summarize(cfg: ml_collections.ConfigDict) -> Callable[[list[dict]], dict]:
    """Host-side summary of a log interval's per-step sums."""
    if name(cfg) == 'electra':
        return electra.summarize
    return functools.partial(summarize_sums, accuracy_key='mlm_accuracy')


def extra_eval_metrics(sums: list[dict]) -> dict:
    """eval_disc_* of an ELECTRA eval's summed terms; nothing for MLM."""
    return electra.disc_metrics(sums) if 'disc_weight_sum' in sums[0] else {}
