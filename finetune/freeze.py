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

The labels feed engine.step's trainable / frozen split: `split_params` returns two trees of
the params' own structure in which the other side's leaves are `None` (an empty pytree
node), so `jax.grad` w.r.t. the trainable half never differentiates a frozen leaf, and
`merge_params` puts the two halves back together.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from engine.step import FROZEN, TRAIN, check_label
from models.paths import count_layers, param_paths, path_of

_NAMED_MODES = "'none', 'embeddings', 'layers:N', 'encoder', or regexes ('re:A,B' or a list)"




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
    frozen = _frozen_predicate(freeze, num_layers, param_paths(params))
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: FROZEN if frozen(path_of(kp)) else TRAIN, params)


def _size(leaf: Any) -> int:
    return int(np.prod(leaf.shape)) if hasattr(leaf, 'shape') else 0


def count_params_by_label(params: Any, labels: Any) -> dict[str, int]:
    """{'train': n, 'frozen': n}: scalar parameter counts per label."""
    counts = {TRAIN: 0, FROZEN: 0}

    def add(label, leaf):
        check_label(label)
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

