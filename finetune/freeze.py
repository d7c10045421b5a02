"""Which parameters train: labels 'train' / 'frozen' over the parameter tree.

`freeze` values:
  'none'          everything trains
  'embeddings'    bert/embeddings/* frozen
  'layers:N'      embeddings and encoder layers 0..N-1 frozen (the bottom N)
  'encoder'       all of bert/* but the pooler frozen: a linear probe on the [CLS] features
                  (pooler + classifier train, so the probe can re-project them)
  're:A,B'        parameters whose '/'-joined path matches any regex (re.search) frozen
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

TRAIN, FROZEN = 'train', 'frozen'


def path_of(key_path) -> str:
    return '/'.join(str(getattr(k, 'key', k)) for k in key_path)


def _frozen_predicate(freeze: str | Sequence[str], num_layers: int):
    if not isinstance(freeze, str):
        patterns = list(freeze)
    elif freeze.startswith('re:'):
        patterns = [p for p in freeze[3:].split(',') if p]
    elif freeze == 'none':
        return lambda path: False
    elif freeze == 'embeddings':
        return lambda path: path.startswith('bert/embeddings/')
    elif freeze == 'encoder':
        return lambda path: path.startswith('bert/') and not path.startswith('bert/pooler/')
    elif freeze.startswith('layers:'):
        count = freeze.split(':', 1)[1]
        if not count.isdigit() or int(count) > num_layers:
            raise ValueError(f"'{freeze}': N must be an integer from 0 to {num_layers}")
        bottom = {f'bert/encoder/layer_{i}/' for i in range(int(count))}
        return lambda path: (path.startswith('bert/embeddings/')
                             or any(path.startswith(b) for b in bottom))
    else:
        raise ValueError(f"{freeze!r} is not one of 'none', 'embeddings', 'layers:N', "
                         "'encoder', 're:REGEX[,REGEX]'")
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f'bad regex: {e}') from None
    return lambda path: any(c.search(path) for c in compiled)


def freeze_labels(params: Any, freeze: str | Sequence[str], num_layers: int) -> Any:
    """A tree like `params` with 'train' or 'frozen' leaves."""
    frozen = _frozen_predicate(freeze, num_layers)
    labels = jax.tree_util.tree_map_with_path(
        lambda kp, _: FROZEN if frozen(path_of(kp)) else TRAIN, params)
    if isinstance(freeze, str) and not freeze.startswith('re:'):
        return labels
    if FROZEN not in jax.tree.leaves(labels):
        raise ValueError(f'{freeze!r} matches no parameter path')
    return labels


def split_params(params: dict, labels: dict) -> tuple[dict, dict]:
    """(trainable, frozen): nested dicts holding only their own leaves (empty branches
    dropped), so `jax.grad` can take the trainable part alone."""
    def split(tree, lab, keep):
        if not isinstance(tree, dict):
            return tree if lab == keep else None
        out = {k: split(v, lab[k], keep) for k, v in tree.items()}
        return {k: v for k, v in out.items()
                if v is not None and not (isinstance(v, dict) and not v)}
    return split(params, labels, TRAIN), split(params, labels, FROZEN)


def merge_params(a: dict, b: dict) -> dict:
    """The union of two disjoint nested dicts (inverse of `split_params`)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_params(out[key], value) if key in out else value
    return out


def count_params_by_label(params: Any, labels: Any) -> dict[str, int]:
    counts = {TRAIN: 0, FROZEN: 0}
    for leaf, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True):
        counts[label] += int(np.prod(leaf.shape))
    return counts


def tree_bytes(tree: Any) -> int:
    """Bytes held by all array leaves (params or optimizer state)."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, 'dtype') and hasattr(x, 'shape'))

