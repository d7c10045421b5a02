"""The text a tokenizer trains on: a bounded, seeded sample spread over the whole corpus.

A corpus within the budget is used whole, in order. A larger one is cut into blocks of
about 1 MiB (at document boundaries) and a seeded choice of blocks filling the budget
is read, so every part of every file can contribute and memory stays bounded by the
budget. TFDS sources contribute a seeded choice of example ranges in the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from engine.errors import ConfigError
from text.corpus import is_indexed, open_indexed_split
from text.units import (
    ENCODING_HINT,
    TFDS_EXAMPLE_BYTES,
    BadInput,
    Unit,
    plan_units,
    unit_documents,
)

BLOCK_BYTES = 1 << 20


def _size(source: str) -> int:
    if is_indexed(source):
        return len(open_indexed_split(source, 'train', 'data.train_files')) * TFDS_EXAMPLE_BYTES
    return os.path.getsize(source)


def sample_texts(sources: Sequence[str], doc_separator: str, budget_bytes: int,
                 seed: int = 0) -> Iterator[str]:
    """Documents of `sources` (text files, 'tfds:'/'hf:' specs), at most ~budget_bytes of them."""
    sources = [s for s in sources if is_indexed(s) or os.path.getsize(s)]
    total = sum(_size(s) for s in sources)
    block = BLOCK_BYTES
    if budget_bytes <= 0 or total <= budget_bytes:
        block = max(total, 1)  # everything, in order
    units = plan_units(sources, (), doc_separator, block)
    units = [_tfds_blocks(u) if u.is_tfds else [u] for u in units]
    units = [u for group in units for u in group]
    if total > budget_bytes > 0:
        rng = np.random.default_rng(seed)
        weights = np.array([u.size for u in units], dtype=np.float64)
        order = rng.permutation(len(units))
        chosen, used = [], 0.0
        for i in order:
            if used >= budget_bytes:
                break
            chosen.append(i)
            used += weights[i]
        units = [units[i] for i in sorted(chosen)]
    bad = BadInput()  # the preparation reports bad input; the sample just leaves it out
    found = 0
    for unit in units:
        for doc in unit_documents(unit, doc_separator, bad, 'skip'):
            found += 1
            yield doc
    if not found and bad.lines:  # else the tokenizer would only say its text is empty
        raise ConfigError(f'data.train_files: no valid UTF-8 text ({bad.summary()}); '
                          f'{ENCODING_HINT}')


def _tfds_blocks(unit: Unit) -> list[Unit]:
    step = max(BLOCK_BYTES // TFDS_EXAMPLE_BYTES, 1)
    return [Unit(unit.number, unit.source, a, min(a + step, unit.end), unit.role, unit.split)
            for a in range(unit.start, unit.end, step)]
