"""The text a tokenizer trains on: a bounded, seeded sample spread over the whole corpus.

A corpus within the budget is used whole, in order. A larger one is cut into blocks of
about 1 MiB (at document boundaries) and a seeded choice of blocks filling the budget
is read, so every part of every file can contribute and memory stays bounded by the
budget. TFDS sources contribute a seeded choice of example ranges in the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from engine.errors import ConfigError
from text.corpus import is_indexed, open_indexed_split
from text.formats import file_format, file_size
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
    return file_size(source)


def sample_texts(sources: Sequence[str], doc_separator: str, budget_bytes: int,
                 seed: int = 0, text_field: str = 'text') -> Iterator[str]:
    """Documents of `sources` (text, JSONL, Parquet files, 'tfds:'/'hf:' specs), at most
    ~budget_bytes of them. A compressed file is one unit read from its start: it gives
    at most its share of the budget (by compressed size)."""
    sources = [s for s in sources if is_indexed(s) or file_size(s)]
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
        left = _allowance(unit, budget_bytes, total)
        for doc in unit_documents(unit, doc_separator, bad, 'skip', text_field):
            found += 1
            yield doc
            left -= len(doc)
            if left <= 0:
                break
    if not found and bad.lines:  # else the tokenizer would only say its text is empty
        raise ConfigError(f'data.train_files: no valid UTF-8 text ({bad.summary()}); '
                          f'{ENCODING_HINT}')


def _allowance(unit: Unit, budget_bytes: int, total: int) -> float:
    """Text bytes a unit may give: unbounded, but a compressed file's (whose text is
    several times its size) at most its share of the budget."""
    if unit.is_tfds or budget_bytes <= 0:
        return float('inf')
    if not any(file_format(path).compression for path, _, _ in unit.ranges()):
        return float('inf')
    return max(budget_bytes * unit.size / total, BLOCK_BYTES)


def _tfds_blocks(unit: Unit) -> list[Unit]:
    step = max(BLOCK_BYTES // TFDS_EXAMPLE_BYTES, 1)
    return [Unit(unit.number, unit.source, a, min(a + step, unit.end), unit.role, unit.split)
            for a in range(unit.start, unit.end, step)]
