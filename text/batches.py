"""Batches of packed sequences: grain over random-access sources, a pure function of
(seed, step), so a run resumes at any step on any mesh without iterator state.

Each source's rows are shuffled per epoch (grain's ShuffleMapDataset permutes epoch e
with seed base + e, by index) and repeated endlessly; several sources are interleaved
by weight (grain's MapDataset.mix: a fixed pattern, so the realised shares are exact).
Global row r of step s is r = s * global_batch + j; this process reads only its slice
[i * B/P, (i + 1) * B/P) of each global batch. Reading and prefetch run in grain's
threads.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from text.records import ArraySequences
from text.tokenizer import PAD_ID


def check_sharding(batch_size: int, process_index: int, process_count: int) -> None:
    if batch_size <= 0:
        raise ValueError(f'batch_size: must be positive, got {batch_size}')
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    if batch_size % process_count:
        raise ValueError(f'batch_size {batch_size} is not divisible by the number of '
                         f'processes {process_count}')


def _as_source(source):
    return ArraySequences(source) if isinstance(source, dict) else source


def _seed_base(seed: int, source: int) -> int:
    # Hashed so that nearby seeds do not share epochs (seed 1's epoch 0 would otherwise
    # be seed 0's epoch 1), and each source of a mixture gets its own order.
    state = np.random.SeedSequence([seed, source] if source else seed).generate_state(1)
    return int(state[0])


def read_rows(sources: Sequence, rows: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """The sequences at (source, row) pairs, in order; one read per source."""
    if len(sources) == 1:
        return sources[0].read([r for _, r in rows])
    by_source: dict[int, list[int]] = {}
    for position, (source, _) in enumerate(rows):
        by_source.setdefault(source, []).append(position)
    out: dict[str, np.ndarray] = {}
    for source, positions in by_source.items():
        part = sources[source].read([rows[p][1] for p in positions])
        for k, v in part.items():
            if k not in out:
                out[k] = np.empty((len(rows),) + v.shape[1:], v.dtype)
            out[k][positions] = v
    return out


class Mixed:
    """Sources interleaved by weight, each row at most once (a mixture's eval set)."""

    def __init__(self, sources: Sequence, weights: Sequence[float] | None):
        self.sources = list(sources)
        parts = [grain.MapDataset.range(len(s)).map(lambda row, i=i: (i, row))
                 for i, s in enumerate(self.sources)]
        self._rows = grain.MapDataset.mix(parts, weights)

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        return read_rows(self.sources, [self._rows[int(i)] for i in indices])


def _order(n: int, seed: int, shuffle: bool, block: int) -> grain.MapDataset:
    """A source's rows, epoch after epoch: each epoch a permutation of its n rows, or with
    block > 1 of its n // block runs of `block` consecutive rows (the < block rows after the
    last whole run are left out), each run served in order. Consecutive rows are neighbours
    in the prepared files, so a bucket serves a run in one range read; the cost is
    batches of runs of neighbouring text (the shuffle is over runs)."""
    if block <= 1:
        order = grain.MapDataset.range(n)
        return (order.shuffle(seed=seed) if shuffle else order).repeat()
    if n < block:
        raise ValueError(f'read_block: {block} is more than the source\'s {n} sequences')
    runs = grain.MapDataset.range(n // block)
    runs = (runs.shuffle(seed=seed) if shuffle else runs).repeat()
    # One permutation lookup per run, not per row (grain's costs 20-200 us here).
    first_row = functools.lru_cache(maxsize=1 << 14)(lambda position: runs[position] * block)
    return grain.MapDataset.range(np.iinfo(np.int64).max).map(
        lambda r: first_row(r // block) + r % block)


class PretrainBatches:
    """Training batches over one source or a weighted mixture of sources.

    A source has `__len__` and `read(indices) -> {key: array}` (a prepared split, or a
    dict of in-memory arrays). read_block > 1 draws rows in runs of that many consecutive
    sequences (see `_order`).
    """

    def __init__(self, sources, global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True,
                 weights: Sequence[float] | None = None, read_block: int = 1):
        sources = [_as_source(s) for s in (sources if isinstance(sources, list) else [sources])]
        for i, s in enumerate(sources):
            if not len(s):
                raise ValueError(f'source {i}: empty; the training corpus produced no sequence')
        if weights is not None and (len(weights) != len(sources) or min(weights) <= 0):
            raise ValueError(f'weights: need one positive weight per source, got {weights}')
        check_sharding(global_batch_size, process_index, process_count)
        self.sources = sources
        self.num_chunks = sum(len(s) for s in sources)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self._offset = process_index * self.local_batch_size
        self._shard, self._shards = process_index, process_count
        orders = [_order(len(s), _seed_base(seed, i), shuffle, read_block).map(
            lambda row, i=i: (i, row)) for i, s in enumerate(sources)]
        self._rows = orders[0] if len(orders) == 1 else grain.MapDataset.mix(orders, weights)

    @property
    def steps_per_epoch(self) -> int:
        """Steps until every sequence of a single source has been served at least once."""
        return math.ceil(self.num_chunks / self.global_batch_size)

    def rows(self, step: int) -> list[tuple[int, int]]:
        """(source, row) of this process's rows at `step`."""
        if step < 0:
            raise ValueError(f'step: must be >= 0, got {step}')
        start = step * self.global_batch_size + self._offset
        return [self._rows[r] for r in range(start, start + self.local_batch_size)]

    def global_rows(self, step: int) -> list[tuple[int, int]]:
        """(source, row) of every process's rows at `step` (the whole global batch)."""
        if step < 0:
            raise ValueError(f'step: must be >= 0, got {step}')
        start = step * self.global_batch_size
        return [self._rows[r] for r in range(start, start + self.global_batch_size)]

    def indices(self, step: int) -> np.ndarray:
        """Row indices of this process's rows at `step` (single source)."""
        return np.array([row for _, row in self.rows(step)], dtype=np.int64)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return read_rows(self.sources, self.rows(step))

    def rows_from(self, start: int, global_size: int) -> list[tuple[int, int]]:
        """(source, row) of this process's share of the `global_size` global rows from global
        row `start` on: for steps of varying size (pretrain.phases), where the rows before a
        step are a function of the step rather than step * global_batch_size."""
        check_sharding(global_size, self._shard, self._shards)
        if start < 0:
            raise ValueError(f'start: must be >= 0, got {start}')
        local = global_size // self._shards
        first = start + self._shard * local
        return [self._rows[r] for r in range(first, first + local)]

    def batch_from(self, start: int, global_size: int) -> dict[str, np.ndarray]:
        return read_rows(self.sources, self.rows_from(start, global_size))

    def iterate(self, start_step: int = 0, prefetch: int = 4,
                num_threads: int = 2) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, batch) from start_step on, read ahead by grain's threads."""
        steps = grain.MapDataset.range(start_step, np.iinfo(np.int64).max)
        batches = steps.map(lambda s: (s, self.batch(s))).to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
        return iter(batches)


def eval_batches(chunks, batch_size: int, process_index: int = 0, process_count: int = 1,
                 max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """A source's rows in order, batch_size at a time (this process's rows of each).

    The last batch is filled with all-[PAD] rows (segment 0) so every batch has one shape;
    masking never picks [PAD], so those rows add nothing to the metrics. max_batches > 0
    stops early (only those rows are read).
    """
    source = _as_source(chunks)
    check_sharding(batch_size, process_index, process_count)
    n = len(source)
    if max_batches:
        n = min(n, max_batches * batch_size)
    local = batch_size // process_count
    lo, hi = process_index * local, (process_index + 1) * local
    for start in range(0, n, batch_size):
        rows = source.read(range(start + lo, min(start + hi, n)))
        out = {}
        for k, v in rows.items():
            if len(v) < local:
                fill = PAD_ID if k == 'input_ids' else 0
                pad = np.full((local - len(v),) + v.shape[1:], fill, dtype=v.dtype)
                v = np.concatenate([v, pad])
            out[k] = v
        yield out
