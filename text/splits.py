"""The train/validation/test split files that named corpora write (tweets, docstrings)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from engine.paths import write_bytes_atomic

SPLITS = ('train', 'validation', 'test')
SPLIT_FRACTIONS = (0.8, 0.1)  # train, validation; the rest is test


def split_bounds(n: int) -> tuple[int, int]:
    """End of train and end of validation for n shuffled rows."""
    n_train = int(n * SPLIT_FRACTIONS[0])
    return n_train, n_train + int(n * SPLIT_FRACTIONS[1])


T = TypeVar('T')


def seeded_split(items: Sequence[T], seed: int) -> dict[str, list[T]]:
    """{split: items}: shuffled by np.random.default_rng(seed) (a stream numpy keeps stable
    across versions), then cut 80/10/10."""
    order = np.random.default_rng(seed).permutation(len(items))
    a, b = split_bounds(len(items))
    bounds = {'train': (0, a), 'validation': (a, b), 'test': (b, len(items))}
    return {s: [items[i] for i in order[lo:hi]] for s, (lo, hi) in bounds.items()}


def write_split(rows: list[tuple[str, str]], stem: pathlib.Path) -> None:
    """STEM.jsonl ({'text', 'label'} per row) and STEM.txt (one text a line)."""
    jsonl = ''.join(json.dumps({'text': t, 'label': lab}, ensure_ascii=False) + '\n'
                    for t, lab in rows)
    # splitlines() knows every line break Python does; the .txt must keep one text a line.
    txt = ''.join(' '.join(t.splitlines()) + '\n' for t, _ in rows)
    write_bytes_atomic(stem.with_suffix('.jsonl'), jsonl.encode('utf-8'))
    write_bytes_atomic(stem.with_suffix('.txt'), txt.encode('utf-8'))
