"""Where a BERT parameter sits, read from its path in the parameter tree: the task head,
encoder layer i, or the embeddings. Freezing rules and per-path learning rates use it."""

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

_LAYER = re.compile(r'^bert/encoder/layer_(\d+)/')


def path_of(key_path: Sequence[Any]) -> str:
    """'/'-joined names of a tree path. Attribute keys (e.g. `nn.Partitioned.value`, or a
    NamedTuple field) are skipped so that boxed and unboxed parameters give the same path."""
    parts = []
    for key in key_path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            continue
        parts.append(str(getattr(key, 'key', getattr(key, 'idx', key))))
    return '/'.join(parts)


def param_paths(tree: Any) -> list[str]:
    """The "/"-joined path of every leaf."""
    return [path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def count_layers(params: Any) -> int:
    """Number of encoder layers in a BERT parameter tree (highest layer_i + 1)."""
    indices = [int(m.group(1)) for p in param_paths(params) if (m := _LAYER.match(p))]
    return max(indices, default=-1) + 1


def is_head(path: str) -> bool:
    """The task head: classifier/* (anything outside bert/) and bert/pooler/*. MLM
    pretraining has no pooler, so it starts from random init like the classifier."""
    return not path.startswith('bert/') or path.startswith('bert/pooler/')


def layer_depth(path: str, num_layers: int) -> int:
    """How far below the output a parameter sits: 0 for the head (classifier/*, bert/pooler/*,
    anything outside bert/), L - i for encoder layer i (1 = the top layer; a pre-LN
    final_layer_norm sits on top of the encoder and goes with it), L + 1 for embeddings.
    Used by layer-wise learning-rate decay."""
    if is_head(path):
        return 0
    if match := _LAYER.match(path):
        index = int(match.group(1))
        if index >= num_layers:
            raise ValueError(f'{path!r}: layer {index} but num_layers={num_layers}')
        return num_layers - index
    if path.startswith('bert/encoder/'):
        return 1
    if path.startswith('bert/embeddings/'):
        return num_layers + 1
    raise ValueError(f'{path!r}: not a known BERT parameter (embeddings, encoder or pooler)')


def prune(tree: dict, dropped: Callable[[str], bool], prefix: str = '') -> dict:
    """A nested dict without the leaves whose '/'-joined path (after `prefix`) `dropped`
    accepts; dicts left empty are removed."""
    out = {}
    for key, value in tree.items():
        path = f'{prefix}{key}'
        if isinstance(value, dict):
            sub = prune(value, dropped, f'{path}/')
            if sub:
                out[key] = sub
        elif not dropped(path):
            out[key] = value
    return out
