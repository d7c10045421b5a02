"""The fine-tuning optimizer over the FULL parameter tree, frozen leaves included:

    chain(L2-SP pull toward the pretrained weights   (masked: pretrained trainable leaves)
          clip_by_global_norm                        (masked: trainable leaves only)
          multi_transform({'frozen': set_to_zero(),  one AdamW per lr group}, group labels))

Frozen leaves get `set_to_zero` (no optimizer state: `EmptyState`, and the AdamW groups see
them as `MaskedNode`s that hold no arrays); the global norm for clipping is computed over
trainable gradients only. The train step never differentiates frozen leaves: it passes
zeros in their place, which nothing reads.

Learning-rate groups: 'head' (pooler + classifier, `head_learning_rate`), and either one
'body' group or, with layer-wise decay, 'embeddings' and 'layer_i' groups whose rate is
learning_rate * layer_decay ** depth (depth 1 for the top layer, L+1 for embeddings).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from engine.optim import weight_decay_mask
from finetune.freeze import FROZEN, TRAIN, path_of

HEAD_PREFIXES = ('classifier/', 'bert/pooler/')


def learning_rate_at(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up over warmup_fraction of the steps, then linear decay to 0."""
    warmup = int(cfg.warmup_fraction * total_steps)
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps - warmup, 1))
    if not warmup:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def _group(path: str, num_layers: int, layer_decay: float) -> str:
    if path.startswith(HEAD_PREFIXES):
        return 'head'
    if layer_decay == 1.0:
        return 'body'
    if path.startswith('bert/encoder/layer_'):
        return 'layer_' + path.split('/')[2].split('_')[1]
    return 'embeddings'  # embeddings and a pre-LN final LayerNorm sit with the bottom


def _group_scale(group: str, cfg, num_layers: int) -> float:
    if group == 'head':
        return (cfg.head_learning_rate or cfg.learning_rate) / cfg.learning_rate
    if group == 'body':
        return 1.0
    depth = num_layers + 1 if group == 'embeddings' else num_layers - int(group[6:])
    return cfg.layer_decay ** depth


def group_labels(params: Any, labels: Any, cfg, num_layers: int) -> Any:
    """'frozen', or the learning-rate group of each trainable leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _, lab: FROZEN if lab == FROZEN else _group(path_of(kp), num_layers,
                                                               cfg.layer_decay),
        params, labels)


class L2SPState(NamedTuple):
    start: Any  # the weights at the start of fine-tuning


def l2sp(strength: float) -> optax.GradientTransformation:
    """Adds strength * (p - p0) to the gradient: L2-SP (Li et al. 2018), a pull toward the
    pretrained weights p0 rather than toward zero. Keeps a copy of p0 as its state."""
    def init(params):
        return L2SPState(start=jax.tree.map(jnp.copy, params))

    def update(grads, state, params):
        grads = jax.tree.map(lambda g, p, p0: g + strength * (p - p0), grads, params, state.start)
        return grads, state
    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, labels: Any,
                   total_steps: int, num_layers: int) -> optax.GradientTransformation:
    groups = group_labels(params, labels, cfg, num_layers)
    trainable = jax.tree.map(lambda lab: lab == TRAIN, labels)
    pretrained = jax.tree_util.tree_map_with_path(
        lambda kp, lab: lab == TRAIN and not path_of(kp).startswith(HEAD_PREFIXES), labels)
    schedule = learning_rate_at(cfg, total_steps)
    transforms = {FROZEN: optax.set_to_zero()}
    for name in set(jax.tree.leaves(groups)) - {FROZEN}:
        scale = _group_scale(name, cfg, num_layers)
        transforms[name] = optax.adamw(lambda step, s=scale: s * schedule(step), b1=cfg.b1,
                                       b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                       mask=weight_decay_mask)
    parts = []
    if cfg.l2sp:
        parts.append(optax.masked(l2sp(cfg.l2sp), pretrained))
    if cfg.max_grad_norm:
        parts.append(optax.masked(optax.clip_by_global_norm(cfg.max_grad_norm), trainable))
    parts.append(optax.multi_transform(transforms, groups))
    return optax.chain(*parts)
