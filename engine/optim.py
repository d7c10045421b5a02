"""Optimizers: AdamW or LAMB with warm-up and decay, weight decay off biases and LayerNorm."""

from typing import Any

import jax
import ml_collections
import optax

from engine.config_cli import ConfigError


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `cfg.learning_rate`, then 'linear' (to 0), 'cosine' or 'constant'."""
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    peak = float(cfg.learning_rate)
    decays = {
        'linear': lambda: optax.linear_schedule(peak, 0.0, decay_steps),
        'cosine': lambda: optax.cosine_decay_schedule(peak, decay_steps),
        'constant': lambda: optax.constant_schedule(peak),
    }
    if cfg.schedule not in decays:
        raise ValueError(f"optimizer.schedule: {cfg.schedule!r} is not one of {list(decays)}")
    warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
    return optax.join_schedules([warm, decays[cfg.schedule]()], [warmup])


def weight_decay_mask(params: Any) -> Any:
    """True for matrices (kernels, embeddings); False for biases and LayerNorm parameters.

    Decided by rank and name rather than by a list of paths, so heads added later follow.
    """
    def decays(path, leaf) -> bool:
        names = [str(getattr(k, 'key', k)) for k in path]
        is_norm = any('LayerNorm' in n or 'layer_norm' in n for n in names)
        return getattr(leaf, 'ndim', 0) >= 2 and not is_norm
    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule; returns a transformation whose
    learning rate at any step is `learning_rate_schedule(cfg, total_steps)(step)`."""
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=weight_decay_mask))
    return optax.chain(*parts)


def lamb(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then LAMB (You et al. 2019, the 76-minute BERT recipe): Adam
    moments with decoupled weight decay (same mask as AdamW), each update rescaled by the
    layer's trust ratio ||param|| / ||update||, for large batches."""
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
    parts.append(optax.lamb(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                            eps=cfg.eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask))
    return optax.chain(*parts)


OPTIMIZERS = {'adamw': adamw, 'lamb': lamb}


def make_optimizer(cfg: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
    """The optimizer `cfg.name` names ('adamw' when the config has no name)."""
    name = cfg.get('name', 'adamw')
    if name not in OPTIMIZERS:
        raise ConfigError(f'optimizer.name: {name!r} is not one of {list(OPTIMIZERS)}')
    return OPTIMIZERS[name](cfg, total_steps)
