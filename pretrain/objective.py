"""The pretraining objective (`objective`: 'mlm' or 'electra') and the masking options that
go with it: which model, train step, eval step, FLOP count and log summary a run uses.

pretrain/train.py asks this module instead of branching itself, so a new objective is one
place to change.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax

from engine.errors import ConfigError
from engine.loop import summarize_sums
from models.bert import BertConfig, BertForMaskedLM
from models.electra import ElectraForPretraining, electra_train_flops, generator_config
from models.flops import train_flops_per_step
from pretrain import electra, steps
from pretrain.masking import MaskingConfig

OBJECTIVES = ('mlm', 'electra')


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The objective's options, read once from the config (`from_config`, which checks
    them): 'mlm' or 'electra', ELECTRA's loss weight and generator size, and the held-out
    evaluation's mask rate (None: the training rate)."""
    name: str = 'mlm'
    disc_weight: float = 50.0
    generator_size: float = 0.25
    eval_mask_rate: float | None = None

    @classmethod
    def from_config(cls, cfg: Any, model_cfg: BertConfig) -> ObjectiveConfig:
        """From a pretraining config (a mapping with `.get`); ConfigError naming the key.
        `model_cfg` is the discriminator ELECTRA's generator is sized from."""
        validate(cfg, model_cfg)
        electra_keys = cfg.get('electra') or {}
        return cls(name=name(cfg), disc_weight=float(electra_keys.get('disc_weight', 50.0)),
                   generator_size=electra_keys.get('generator_size', 0.25),
                   eval_mask_rate=cfg.masking.get('eval_mask_rate'))


def name(cfg: Any) -> str:
    """The run's objective ('mlm' for configs written before the key existed)."""
    return cfg.get('objective', 'mlm')


def validate(cfg: Any, model_cfg: BertConfig) -> None:
    """One-line ConfigErrors for the objective and masking options of a config."""
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


def eval_masking(objective: ObjectiveConfig, masking: MaskingConfig, seq_len: int
                 ) -> MaskingConfig:
    """The held-out evaluation's masking: independent tokens (no spans, so span and token
    runs score the same task) at masking.eval_mask_rate, slots sized from that rate (the
    training ones when both rates are equal, so a default run evaluates as before)."""
    rate = masking.mask_rate if objective.eval_mask_rate is None else objective.eval_mask_rate
    slots = masking.max_predictions
    if rate != masking.mask_rate:
        slots = math.ceil(rate * seq_len)
    return dataclasses.replace(masking, mask_rate=rate, max_predictions=slots, span_length=0.0)


def build_model(objective: ObjectiveConfig, model_cfg: BertConfig) -> nn.Module:
    """BertForMaskedLM, or ELECTRA's generator + discriminator (discriminator = model_cfg)."""
    if objective.name == 'electra':
        return ElectraForPretraining(model_cfg, generator_config(model_cfg,
                                                                 objective.generator_size))
    return BertForMaskedLM(model_cfg)


def make_train_step(objective: ObjectiveConfig, model: nn.Module,
                    tx: optax.GradientTransformation, schedule: Callable,
                    masking: MaskingConfig, word_starts: jax.Array | None, *, seed: int,
                    grad_accum_steps: int) -> Callable:
    """(state, batch) -> (state, metrics), not yet jitted."""
    common = dict(model=model, tx=tx, schedule=schedule, masking=masking,
                  word_starts=word_starts, seed=seed, grad_accum_steps=grad_accum_steps)
    if objective.name == 'electra':
        return electra.electra_train_step(disc_weight=objective.disc_weight, **common)
    return steps.mlm_train_step(**common)


def make_eval_step(objective: ObjectiveConfig, model: nn.Module, masking: MaskingConfig,
                   word_starts: jax.Array | None, *, seed: int, seq_len: int) -> Callable:
    """(params, batch, index) -> summed eval terms, not yet jitted (eval masking)."""
    common = dict(model=model, masking=eval_masking(objective, masking, seq_len),
                  word_starts=word_starts, seed=seed)
    if objective.name == 'electra':
        return functools.partial(electra.eval_step, disc_weight=objective.disc_weight,
                                 **common)
    return functools.partial(steps.eval_step, **common)


def flops_per_step(model: nn.Module, batch_size: int, seq_len: int,
                   max_predictions: int) -> float:
    """Model FLOPs of one training step (both models for ELECTRA)."""
    if isinstance(model, ElectraForPretraining):
        return electra_train_flops(model.config, model.generator_config, batch_size,
                                   seq_len, max_predictions)
    return train_flops_per_step(model.config, batch_size, seq_len, max_predictions)


def summarize(objective: ObjectiveConfig) -> Callable[[list[dict]], dict]:
    """Host-side summary of a log interval's per-step sums."""
    if objective.name == 'electra':
        return electra.summarize
    return functools.partial(summarize_sums, accuracy_key='mlm_accuracy')


def extra_eval_metrics(sums: list[dict]) -> dict:
    """eval_disc_* of an ELECTRA eval's summed terms; nothing for MLM."""
    return electra.disc_metrics(sums) if 'disc_weight_sum' in sums[0] else {}
