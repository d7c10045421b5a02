"""Optimizers: one builder, `make_optimizer`, for both stages.

Pretraining (no labels): AdamW or LAMB with warm-up and decay, weight decay off biases and
LayerNorm, clipping by global norm.

Path rules (fine-tuning: labels given): the transformation is built over the parameters'
structure with the static 'train' / 'frozen' labels of `finetune.freeze`:

    multi_transform({
        'frozen': set_to_zero(),                        # no state, zero updates
        'train':  chain(l2sp(strength)   [pretrained leaves only, if l2sp > 0],
                        clip_by_global_norm(max_grad_norm),
                        scale_by_adam, add_decayed_weights(weight_decay, mask),
                        scale_by_schedule(warm-up/decay shape in [0, 1]),
                        scale by -(peak learning rate of the leaf's group)),
    }, labels)

Inside the 'train' branch every frozen leaf is an `optax.MaskedNode` (an empty pytree), so:
Adam moments and the L2-SP anchor exist for trainable leaves only; the global norm used for
clipping is over trainable gradients only; frozen leaves never reach any arithmetic.

Contract with the train step (see `engine.step.split_params`):
    trainable, frozen = split_params(params, labels)
    grads = jax.grad(loss)(trainable, frozen, ...)   # None at frozen leaves: never computed
    updates, opt_state = tx.update(grads, opt_state, trainable)
    params = merge_params(optax.apply_updates(trainable, updates), frozen)
Frozen values are passed through untouched, hence bit-identical. For convenience the
optimizer equally accepts full trees (`tx.init(params)`; zeros or any placeholder as the
frozen gradients, full params in `update`): the frozen placeholders are never read, and
their updates are exact zeros. `tx.init` gives the same state structure either way.

Learning rates: every trainable leaf has a peak rate (`peak_learning_rates`): the head
(classifier/*, bert/pooler/*) gets `head_learning_rate` (0 = `learning_rate`); with
layer_decay < 1 encoder layer i of L gets learning_rate * layer_decay ** (L - i) and the
embeddings layer_decay ** (L + 1). One shared schedule shape (linear warm-up over
warmup_fraction of the steps, then linear decay to 0) multiplies all of them. A single Adam
with a per-leaf rate equals one AdamW per group (Adam is element-wise and every group steps
together) without one step counter per group.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from engine.errors import ConfigError
from engine.step import FROZEN, TRAIN
from models.paths import count_layers, is_head, layer_depth, path_of


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer settings of a run, read from the config once at the entry
    (`from_config`) and validated; everything below takes this, never the config. Both
    stages keep them in an `optimizer` section (fine-tuning's top-level keys are aliases of
    its entries); a key a section lacks takes the default here (the fine-tuning recipe's)."""

    name: str = 'adamw'  # without labels: 'adamw' or 'lamb'
    learning_rate: float = 2e-5  # peak
    # After warm-up: 'linear' (to 0), 'cosine', 'constant', 'wsd' (warmup-stable-decay) or
    # 'budget' (WSD over the fraction of the run's budget spent; see `budget_learning_rate`).
    schedule: str = 'linear'
    decay_fraction: float = 0.1  # wsd/budget: the decay takes this last share of the run
    decay_shape: str = 'linear'  # wsd/budget decay to 0: 'linear', 'cosine' or 'sqrt'
    warmup_steps: int = 0  # pretraining's warm-up
    warmup_fraction: float = 0.1  # path rules' warm-up, as a fraction of the steps (ceil)
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    max_grad_norm: float = 1.0  # 0 = no clipping
    head_learning_rate: float = 0.0  # path rules: the head's peak (0 = learning_rate)
    layer_decay: float = 1.0  # path rules: layer-wise decay from the top (1 = off)
    l2sp: float = 0.0  # path rules: L2-SP strength (0 = off)
    # Adam's first moment: '' = the parameters' dtype, 'bfloat16' halves it (MaxText's
    # mu_dtype); the second moment keeps the parameters' dtype (its range needs it).
    mu_dtype: str = ''
    prefix: str = 'optimizer.'  # where the keys live, for error messages

    def __post_init__(self):
        def fail(key: str, message: str):
            raise ConfigError(f'{self.prefix}{key}: {message}')
        if self.name not in OPTIMIZERS:
            fail('name', f'{self.name!r} is not one of {list(OPTIMIZERS)}')
        if self.schedule not in SCHEDULES:
            fail('schedule', f'{self.schedule!r} is not one of {list(SCHEDULES)}')
        if self.decay_shape not in DECAY_SHAPES:
            fail('decay_shape', f'{self.decay_shape!r} is not one of {list(DECAY_SHAPES)}')
        if not 0.0 <= self.decay_fraction <= 1.0:
            fail('decay_fraction', f'must be in [0, 1], got {self.decay_fraction}')
        if self.learning_rate < 0:
            fail('learning_rate', f'must be >= 0, got {self.learning_rate}')
        if self.warmup_steps < 0:
            fail('warmup_steps', f'must be >= 0, got {self.warmup_steps}')
        if not 0.0 <= self.warmup_fraction <= 1.0:
            fail('warmup_fraction', f'must be in [0, 1], got {self.warmup_fraction}')
        if self.layer_decay <= 0.0:
            fail('layer_decay', f'must be > 0, got {self.layer_decay}')
        if self.mu_dtype not in MU_DTYPES:
            fail('mu_dtype', f'{self.mu_dtype!r} is not one of {list(MU_DTYPES)}')
        if self.mu_dtype and self.name == 'lamb':
            fail('mu_dtype', "optax's LAMB keeps its moments in the parameters' dtype; use "
                 "name=adamw or mu_dtype=''")
        for key in ('weight_decay', 'max_grad_norm', 'head_learning_rate', 'l2sp'):
            if getattr(self, key) < 0:
                fail(key, f'must be >= 0, got {getattr(self, key)}')

    @classmethod
    def from_config(cls, section: Any, prefix: str = 'optimizer.') -> OptimizerConfig:
        """From a config section (a mapping with `.get`); `prefix` names it in errors."""
        casts = {'str': str, 'int': int, 'float': float}  # annotations are strings here
        kinds = {f.name: casts[f.type] for f in dataclasses.fields(cls) if f.name != 'prefix'}
        given = {k: cast(section.get(k)) for k, cast in kinds.items()
                 if section.get(k) is not None}
        return cls(**given, prefix=prefix)


SCHEDULES = ('linear', 'cosine', 'constant', 'wsd', 'budget')
MU_DTYPES = ('', 'float32', 'bfloat16')


def mu_dtype(cfg: OptimizerConfig) -> Any:
    """The first moment's dtype for optax (None: the parameters')."""
    return jnp.dtype(cfg.mu_dtype) if cfg.mu_dtype else None

# Decay shapes of wsd/budget: t in [0, 1] through the decay -> multiplier of the peak.
# 'sqrt' is 1 - sqrt(t), the WSD papers' choice (Hägele et al. 2024, "Scaling Laws and
# Compute-Optimal Training Beyond Fixed Training Durations"): it drops fast, then flattens.
DECAY_SHAPES = {
    'linear': lambda t: 1.0 - t,
    'cosine': lambda t: 0.5 * (1.0 + jnp.cos(jnp.pi * t)),
    'sqrt': lambda t: 1.0 - jnp.sqrt(t),
}


def typed(cfg: Any) -> OptimizerConfig:
    """`cfg` itself; a TypeError for anything else (a config section must be read at the
    entry with `OptimizerConfig.from_config`, not below it)."""
    if not isinstance(cfg, OptimizerConfig):
        raise TypeError(f'expected an OptimizerConfig, got {type(cfg).__name__} '
                        '(read the section once with OptimizerConfig.from_config)')
    return cfg


def stable_decay(cfg: OptimizerConfig, progress: Any) -> Any:
    """The WSD multiplier (after warm-up) at `progress` in [0, 1] of the run: 1 until
    1 - decay_fraction, then `decay_shape` down to 0 at progress 1. Works on floats and
    jax arrays."""
    cfg = typed(cfg)
    start = 1.0 - cfg.decay_fraction
    if cfg.decay_fraction <= 0:
        return jnp.where(jnp.asarray(progress) >= 1.0, 0.0, 1.0)
    t = jnp.clip((jnp.asarray(progress, jnp.float32) - start) / cfg.decay_fraction, 0.0, 1.0)
    return DECAY_SHAPES[cfg.decay_shape](t)


def _warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    """warmup_steps, capped at total_steps - 1."""
    return min(int(cfg.warmup_steps), max(total_steps - 1, 0))


def warmup_factor(cfg: OptimizerConfig, step: Any, total_steps: int) -> Any:
    """Linear warm-up multiplier min(step / warmup_steps, 1) (1 without warm-up)."""
    cfg = typed(cfg)
    warmup = _warmup_steps(cfg, total_steps)
    if not warmup:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup, 1.0)


def budget_learning_rate(cfg: OptimizerConfig, step: int, progress: float,
                         total_steps: int) -> float:
    """schedule='budget': peak x warm-up(step) x stable_decay(progress), where the host
    measures `progress` = max(elapsed / max_runtime, tokens / train_tokens, step /
    num_train_steps) - whichever budget ends first (engine.budget.Budget.progress)."""
    cfg = typed(cfg)
    return float(cfg.learning_rate * warmup_factor(cfg, step, total_steps)
                 * stable_decay(cfg, min(max(progress, 0.0), 1.0)))


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `cfg.learning_rate`, then 'linear' (to 0), 'cosine', 'constant' or
    'wsd'. For 'budget' this is the step-driven part only (budget = num_train_steps): the
    train step takes the host's rate instead (see `budget_learning_rate`)."""
    cfg = typed(cfg)
    if cfg.schedule in ('wsd', 'budget'):
        peak = float(cfg.learning_rate)
        return lambda step: peak * warmup_factor(cfg, step, total_steps) * stable_decay(
            cfg, jnp.asarray(step, jnp.float32) / max(total_steps, 1))
    warmup = _warmup_steps(cfg, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    peak = float(cfg.learning_rate)
    decays = {
        'linear': lambda: optax.linear_schedule(peak, 0.0, decay_steps),
        'cosine': lambda: optax.cosine_decay_schedule(peak, decay_steps),
        'constant': lambda: optax.constant_schedule(peak),
    }
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


def adamw(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule; returns a transformation whose
    learning rate at any step is `learning_rate_schedule(cfg, total_steps)(step)`."""
    return _clipped(optax.adamw, typed(cfg), total_steps)


def lamb(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then LAMB (You et al. 2019, the 76-minute BERT recipe): Adam
    moments with decoupled weight decay (same mask as AdamW), each update rescaled by the
    layer's trust ratio ||param|| / ||update||, for large batches."""
    return _clipped(optax.lamb, typed(cfg), total_steps)


def _clipped(optimizer: Callable, cfg: OptimizerConfig,
             total_steps: int) -> optax.GradientTransformation:
    """Clipping by global norm (unless max_grad_norm is 0), then `optimizer` (adamw, lamb)
    with the schedule, decoupled weight decay off biases and LayerNorm."""
    parts = []
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(float(cfg.max_grad_norm)))
    moments = {'mu_dtype': mu_dtype(cfg)} if optimizer is optax.adamw else {}
    parts.append(_base(optimizer, cfg, total_steps)(
        b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=weight_decay_mask, **moments))
    return optax.chain(*parts)


def _base(optimizer: Callable, cfg: OptimizerConfig, total_steps: int) -> Callable:
    """`optimizer` with its learning rate bound: the step schedule, or for 'budget' a
    learning rate held in the optimizer state (optax.inject_hyperparams) that the train step
    overwrites each step with the host's value (engine.step.set_learning_rate), so it is
    checkpointed with the state."""
    if cfg.schedule == 'budget':
        static = ('mask', 'mu_dtype') if optimizer is optax.adamw else ('mask',)
        injected = optax.inject_hyperparams(optimizer, static_args=static)
        return functools.partial(injected, learning_rate=0.0)
    return functools.partial(optimizer, learning_rate_schedule(cfg, total_steps))


OPTIMIZERS = {'adamw': adamw, 'lamb': lamb}


def make_optimizer(cfg: OptimizerConfig, total_steps: int, params: Any = None,
                   labels: Any = None, num_layers: int | None = None
                   ) -> optax.GradientTransformation:
    """The one optimizer builder. Without `labels` (pretraining: everything trains at one
    rate) the optimizer `cfg.name` names. With `labels` ('train'/'frozen' per leaf of
    `params`), the path-rule optimizer below: frozen leaves get no state and zero updates,
    learning rates follow each leaf's path."""
    if labels is not None:
        if typed(cfg).schedule == 'budget':
            raise ConfigError("schedule: 'budget' is for pretraining; fine-tuning decays "
                              'linearly over its steps')
        return _rule_optimizer(cfg, params, labels,
                               total_steps, num_layers)
    cfg = typed(cfg)
    return OPTIMIZERS[cfg.name](cfg, total_steps)


# ---------------------------------------------------------------- path rules

def _shape_schedule(cfg: OptimizerConfig, total_steps: int,
                    peak: float) -> optax.Schedule:
    """engine.optim's warm-up + linear decay, with warm-up given as a fraction of the run."""
    fraction = cfg.warmup_fraction
    # ceil like Hugging Face's warmup_ratio: any positive fraction warms up for >= 1 step.
    warmup = math.ceil(fraction * total_steps)
    shape = OptimizerConfig(learning_rate=peak, warmup_steps=warmup, schedule='linear')
    return learning_rate_schedule(shape, total_steps)


def learning_rate_at(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """step -> the body's learning rate (peak `learning_rate`), for logging."""
    cfg = typed(cfg)
    return _shape_schedule(cfg, total_steps, cfg.learning_rate)


def _peak_of(cfg: OptimizerConfig, num_layers: int) -> Callable[[str], float]:
    lr, decay = cfg.learning_rate, cfg.layer_decay
    head = cfg.head_learning_rate or lr

    def peak(path: str) -> float:
        depth = layer_depth(path, num_layers)
        return head if depth == 0 else lr * decay ** depth
    return peak


def peak_learning_rates(cfg: OptimizerConfig, params: Any, num_layers: int | None = None) -> Any:
    """A tree of `params`' structure: each leaf's peak learning rate (see the module doc)."""
    cfg = typed(cfg)
    peak = _peak_of(cfg, count_layers(params) if num_layers is None else num_layers)
    return jax.tree_util.tree_map_with_path(lambda kp, _: peak(path_of(kp)), params)


def _scale_by_path(scale_of: Callable[[str], float]) -> optax.GradientTransformation:
    """Multiplies each update by a constant chosen by its path (MaskedNodes are skipped)."""
    def update(updates, state, params=None):
        del params
        scaled = jax.tree_util.tree_map_with_path(
            lambda kp, u: u * jnp.asarray(scale_of(path_of(kp)), u.dtype), updates)
        return scaled, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class L2SPState(NamedTuple):
    start: Any  # p0: the (pretrained) weights passed to `init`


def l2sp(strength: float) -> optax.GradientTransformation:
    """L2-SP (Li et al. 2018): adds strength * (p - p0) to the gradient, the gradient of
    strength/2 * ||p - p0||^2, which pulls weights toward their starting (pretrained) values
    p0 rather than toward zero. p0 is copied from the params given to `init` and kept in the
    optimizer state (one extra float per leaf it applies to); `update` needs `params`."""
    def init(params):
        return L2SPState(start=jax.tree.map(jnp.copy, params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError('l2sp needs the current params in tx.update(grads, state, params)')
        pulled = jax.tree.map(lambda g, p, p0: g + strength * (p - p0).astype(g.dtype),
                              grads, params, state.start)
        return pulled, state
    return optax.GradientTransformation(init, update)


def _pretrained_mask(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda kp, _: not is_head(path_of(kp)), tree)


def _train_branch(cfg: OptimizerConfig, num_layers: int,
                  total_steps: int) -> optax.GradientTransformation:
    """Everything a trainable leaf goes through; frozen leaves are MaskedNodes in here."""
    parts = []
    if cfg.l2sp:
        # Before clipping: the penalty is a term of the objective, so it is clipped with it.
        parts.append(optax.masked(l2sp(cfg.l2sp), _pretrained_mask))
    if cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=mu_dtype(cfg)))
    if cfg.weight_decay:
        # Decoupled (AdamW) decay, scaled by the leaf's learning rate like optax.adamw.
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask))
    peak = _peak_of(cfg, num_layers)
    parts += [optax.scale_by_schedule(_shape_schedule(cfg, total_steps, 1.0)),
              _scale_by_path(lambda path: -peak(path))]
    return optax.chain(*parts)


def _rule_optimizer(cfg: OptimizerConfig, params: Any, labels: Any,
                    total_steps: int, num_layers: int | None = None
                    ) -> optax.GradientTransformation:
    """The path-rule optimizer for `labels` (from `finetune.freeze.freeze_labels`).

    `cfg` fields: learning_rate, head_learning_rate, warmup_fraction, weight_decay,
    layer_decay, max_grad_norm (0 = no clipping), b1, b2, eps, l2sp (see the module doc).
    `num_layers` defaults to the number of encoder layers in `params`. With l2sp > 0, call
    `tx.init` on the pretrained weights: they become the L2-SP anchor p0."""
    if total_steps < 1:
        raise ValueError(f'total_steps must be >= 1, got {total_steps}')
    found = count_layers(params)
    if num_layers is None:
        num_layers = found
    elif found and found != num_layers:
        raise ValueError(f'num_layers={num_layers} but the parameters have {found} layers')
    bad = set(jax.tree.leaves(labels)) - {TRAIN, FROZEN}
    if bad:
        raise ValueError(f'labels must be {TRAIN!r} or {FROZEN!r}, got {sorted(bad)}')
    peak_learning_rates(cfg, params, num_layers)  # fails early on unknown paths or bad cfg
    return optax.multi_transform(
        {TRAIN: _train_branch(cfg, num_layers, total_steps), FROZEN: optax.set_to_zero()},
        labels)
