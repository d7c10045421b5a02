"""Which parameters train: a static tree of 'train' / 'frozen' labels over the parameters.

`freeze` values (see `freeze_labels`):
  'none'          everything trains
  'embeddings'    bert/embeddings/* frozen
  'layers:N'      embeddings and the bottom N encoder layers (layer_0 .. layer_{N-1}) frozen
  'encoder'       all of bert/* except the pooler frozen: a linear probe that trains pooler +
                  classifier. Pretraining here is MLM only and contributes no pooler (it is
                  freshly initialised, like the classifier), so a frozen pooler would be a
                  fixed random projection of [CLS]; training it costs hidden_size**2 + hidden
                  parameters and makes the probe a small MLP on the frozen features.
  ['re1', 're2']  (a list/tuple, or the string 're:re1,re2') parameters whose '/'-joined path
                  (e.g. 'bert/encoder/layer_0/attention/self/query/kernel') matches any of the
                  regexes under `re.search` are frozen; every regex must match something.

Trainable / frozen split: `split_params` returns two trees of the params' own structure in
which the other side's leaves are `None` (an empty pytree node). `jax.grad` of
`loss(trainable, frozen)` w.r.t. `trainable` then never differentiates a frozen leaf - its
gradient leaf is simply `None` - and `merge_params` puts the two halves back together. Both
are pure tree maps (no host round trip), so they trace under `jax.jit` and keep shardings.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

TRAIN, FROZEN = 'train', 'frozen'
_LAYER = re.compile(r'^bert/encoder/layer_(\d+)/')
_NAMED_MODES = "'none', 'embeddings', 'layers:N', 'encoder', or regexes ('re:A,B' or a list)"


def path_of(key_path: Sequence[Any]) -> str:
    """'/'-joined names of a tree path. Attribute keys (e.g. `nn.Partitioned.value`, or a
    NamedTuple field) are skipped so that boxed and unboxed parameters give the same path."""
    parts = []
    for key in key_path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            continue
        parts.append(str(getattr(key, 'key', getattr(key, 'idx', key))))
    return '/'.join(parts)


def _paths(tree: Any) -> list[str]:
    return [path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def count_layers(params: Any) -> int:
    """Number of encoder layers in a BERT parameter tree (highest layer_i + 1)."""
    indices = [int(m.group(1)) for p in _paths(params) if (m := _LAYER.match(p))]
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


def _regexes(freeze: str | Sequence[str]) -> list[str] | None:
    """The regex list of a regex-valued `freeze`, or None for a named mode."""
    if isinstance(freeze, str):
        if not freeze.startswith('re:'):
            return None
        return [p.strip() for p in freeze[3:].split(',') if p.strip()]
    return list(freeze)


def _regex_predicate(freeze: str | Sequence[str], patterns: list[str], paths: list[str]):
    if not patterns:
        raise ValueError(f'freeze={freeze!r}: no regex given')
    try:
        compiled = [re.compile(p) for p in patterns]
    except (re.error, TypeError) as e:
        raise ValueError(f'freeze={freeze!r}: bad regex: {e}') from None
    for pattern, regex in zip(patterns, compiled, strict=True):
        # A regex that matches nothing is almost always a typo: fail instead of training all.
        if not any(regex.search(p) for p in paths):
            raise ValueError(f'freeze={freeze!r}: regex {pattern!r} matches no parameter path')
    return lambda path: any(r.search(path) for r in compiled)


def _bottom_layers_predicate(freeze: str, num_layers: int):
    count = freeze.split(':', 1)[1].strip()
    if not count.isdigit():
        raise ValueError(f"freeze={freeze!r}: 'layers:N' needs an integer N >= 0")
    if int(count) > num_layers:
        raise ValueError(f'freeze={freeze!r}: N={count} > num_layers={num_layers}')
    bottom = tuple(f'bert/encoder/layer_{i}/' for i in range(int(count)))
    return lambda path: path.startswith(('bert/embeddings/', *bottom))


def _frozen_predicate(freeze: str | Sequence[str], num_layers: int, paths: list[str]):
    """path -> bool: whether the parameter at `path` is frozen."""
    patterns = _regexes(freeze)
    if patterns is not None:
        return _regex_predicate(freeze, patterns, paths)
    if freeze == 'none':
        return lambda path: False
    if freeze == 'embeddings':
        return lambda path: path.startswith('bert/embeddings/')
    if freeze == 'encoder':
        return lambda path: path.startswith('bert/') and not path.startswith('bert/pooler/')
    if freeze.startswith('layers:'):
        return _bottom_layers_predicate(freeze, num_layers)
    raise ValueError(f'freeze={freeze!r}: unknown value; expected {_NAMED_MODES}')


def freeze_labels(params: Any, freeze: str | Sequence[str], num_layers: int) -> Any:
    """A tree of `params`' structure with 'train' / 'frozen' leaves (see the module doc).

    `params` may hold arrays, `jax.ShapeDtypeStruct`s or `nn.Partitioned` boxes; only paths
    are read. Raises ValueError for an unknown `freeze`, a regex matching nothing, or
    'layers:N' with N > num_layers (or a num_layers that disagrees with the tree)."""
    found = count_layers(params)
    if found and found != num_layers:
        raise ValueError(f'num_layers={num_layers} but the parameters have {found} layers')
    frozen = _frozen_predicate(freeze, num_layers, _paths(params))
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: FROZEN if frozen(path_of(kp)) else TRAIN, params)


def _check_label(label: Any) -> None:
    if label not in (TRAIN, FROZEN):
        raise ValueError(f'label {label!r} is neither {TRAIN!r} nor {FROZEN!r}')


def _keep(side: str):
    def pick(leaf, label):
        _check_label(label)
        return leaf if label == side else None
    return pick


def split_params(params: Any, labels: Any) -> tuple[Any, Any]:
    """(trainable, frozen): trees of `params`' structure holding their own leaves and `None`
    in place of the other side's. Works on any tree of `params`' structure (grads, updates)."""
    return (jax.tree.map(_keep(TRAIN), params, labels),
            jax.tree.map(_keep(FROZEN), params, labels))


def merge_params(trainable: Any, frozen: Any) -> Any:
    """The inverse of `split_params`: each leaf from whichever side is not None."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)


def _size(leaf: Any) -> int:
    return int(np.prod(leaf.shape)) if hasattr(leaf, 'shape') else 0


def count_params_by_label(params: Any, labels: Any) -> dict[str, int]:
    """{'train': n, 'frozen': n}: scalar parameter counts per label."""
    counts = {TRAIN: 0, FROZEN: 0}

    def add(label, leaf):
        _check_label(label)
        counts[label] += _size(leaf)
    jax.tree.map(add, labels, params)
    return counts


def tree_bytes(tree: Any) -> int:
    """Bytes of all array leaves of any tree (params, optimizer states, ShapeDtypeStructs).
    Global (logical) sizes: a sharded array counts once, not once per device."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        itemsize = getattr(getattr(leaf, 'dtype', None), 'itemsize', None)  # PRNG keys too
        if itemsize is not None and hasattr(leaf, 'shape'):
            total += _size(leaf) * itemsize
    return total

