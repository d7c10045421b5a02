"""The fine-tuning optimizer: AdamW with frozen parameters, LR groups, clipping and L2-SP.

Design. The transformation is built over the parameters' structure with the static
'train' / 'frozen' labels of `finetune.freeze`:

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

Contract with the train step (see `finetune.freeze.split_params`):
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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from engine.optim import learning_rate_schedule, weight_decay_mask
from finetune.freeze import FROZEN, TRAIN, count_layers, is_head, layer_depth, path_of

_DEFAULTS = dict(learning_rate=2e-5, head_learning_rate=0.0, warmup_fraction=0.1,
                 weight_decay=0.01, layer_decay=1.0, max_grad_norm=1.0, b1=0.9, b2=0.999,
                 eps=1e-6, l2sp=0.0)


def _get(cfg: ml_collections.ConfigDict, name: str) -> float:
    return float(cfg.get(name, _DEFAULTS[name]))


def _shape_schedule(cfg: ml_collections.ConfigDict, total_steps: int,
                    peak: float) -> optax.Schedule:
    """engine.optim's warm-up + linear decay, with warm-up given as a fraction of the run."""
    fraction = _get(cfg, 'warmup_fraction')
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f'warmup_fraction must be in [0, 1], got {fraction}')
    # ceil like Hugging Face's warmup_ratio: any positive fraction warms up for >= 1 step.
    warmup = math.ceil(fraction * total_steps)
    sched = ml_collections.ConfigDict(
        dict(learning_rate=peak, warmup_steps=warmup, schedule='linear'))
    return learning_rate_schedule(sched, total_steps)


def learning_rate_at(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """step -> the body's learning rate (peak `learning_rate`), for logging."""
    return _shape_schedule(cfg, total_steps, _get(cfg, 'learning_rate'))


def _peak_of(cfg: ml_collections.ConfigDict, num_layers: int) -> Callable[[str], float]:
    lr, decay = _get(cfg, 'learning_rate'), _get(cfg, 'layer_decay')
    head = _get(cfg, 'head_learning_rate') or lr
    if decay <= 0.0:
        raise ValueError(f'layer_decay must be > 0, got {decay}')

    def peak(path: str) -> float:
        depth = layer_depth(path, num_layers)
        return head if depth == 0 else lr * decay ** depth
    return peak


def peak_learning_rates(cfg: ml_collections.ConfigDict, params: Any,
                        num_layers: int | None = None) -> Any:
    """A tree of `params`' structure: each leaf's peak learning rate (see the module doc)."""
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


def _train_branch(cfg: ml_collections.ConfigDict, num_layers: int,
                  total_steps: int) -> optax.GradientTransformation:
    """Everything a trainable leaf goes through; frozen leaves are MaskedNodes in here."""
    parts = []
    if _get(cfg, 'l2sp'):
        # Before clipping: the penalty is a term of the objective, so it is clipped with it.
        parts.append(optax.masked(l2sp(_get(cfg, 'l2sp')), _pretrained_mask))
    if _get(cfg, 'max_grad_norm'):
        parts.append(optax.clip_by_global_norm(_get(cfg, 'max_grad_norm')))
    parts.append(optax.scale_by_adam(b1=_get(cfg, 'b1'), b2=_get(cfg, 'b2'), eps=_get(cfg, 'eps')))
    if _get(cfg, 'weight_decay'):
        # Decoupled (AdamW) decay, scaled by the leaf's learning rate like optax.adamw.
        parts.append(optax.add_decayed_weights(_get(cfg, 'weight_decay'), mask=weight_decay_mask))
    peak = _peak_of(cfg, num_layers)
    parts += [optax.scale_by_schedule(_shape_schedule(cfg, total_steps, 1.0)),
              _scale_by_path(lambda path: -peak(path))]
    return optax.chain(*parts)


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, labels: Any,
                   total_steps: int, num_layers: int | None = None
                   ) -> optax.GradientTransformation:
    """The fine-tuning optimizer for `labels` (from `freeze_labels(params, ...)`).

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
