"""Steps of different shapes in one run, and the host-fed learning rate of schedule='budget'.

- `seq_len_phases` 'LEN:FRACTION,...' (e.g. '128:0.9,512:0.1', BERT's recipe): the steps
  are cut into consecutive phases (boundaries at round(cumulative fraction x steps)), each
  training on data prepared at its length. The batch stays `batch_size` sequences, so a
  longer phase trains on more tokens per step. Parameters and optimizer state carry over;
  the jitted step is compiled once per length. Evaluation, init and the logged seq_len are
  the last phase's length (pretrain/sections.py `final_config`).
- `batch_size_ramp` 'START:FRACTION' (e.g. '256:0.05'): the global batch grows from START
  to `batch_size` over that fraction of the steps, in RAMP_STAGES equal stages whose sizes
  are START plus multiples of START on the line between the two (at most 8 distinct sizes:
  each is a compile), then `batch_size`. START must divide over the data-parallel devices
  and micro-batches, hence every ramp size does too.

A step's shape (length, size) and the rows read before it are pure functions of the step,
so a run resumed anywhere - across a phase or ramp boundary too - reads the same data: the
batch of data index i holds rows [rows_before(i), rows_before(i) + size) of the phase's
own row stream (text.batches.PretrainBatches.batch_from). Each phase has its own prepared
data, so phase 2 starts at row rows_before(its first step) of the longer sequences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np

from engine.budget import Budget
from engine.errors import ConfigError
from engine.optim import OptimizerConfig, budget_learning_rate
from text.batches import PretrainBatches

RAMP_STAGES = 7  # sizes during the ramp; with the final batch_size, 8 shapes at most


@dataclasses.dataclass(frozen=True)
class Phase:
    seq_len: int
    start: int  # first step (0-based: steps done before it)
    end: int  # one past its last step


def parse_phases(text: str, num_steps: int) -> tuple[Phase, ...]:
    """'128:0.9,512:0.1' -> phases over `num_steps` steps; () for ''. One-line ConfigError."""
    if not str(text).strip():
        return ()
    try:
        items = [(int(a), float(b)) for a, b in (p.split(':') for p in str(text).split(','))]
    except ValueError:
        items = []
    if not items or any(n < 2 or f <= 0 for n, f in items) or abs(
            sum(f for _, f in items) - 1.0) > 1e-6:
        raise ConfigError(f"seq_len_phases: expected 'LEN:FRACTION,...' with lengths >= 2 and "
                          f"fractions > 0 summing to 1 (e.g. '128:0.9,512:0.1'), got {text!r}")
    phases, start, total = [], 0, 0.0
    for index, (length, fraction) in enumerate(items):
        total += fraction
        end = num_steps if index == len(items) - 1 else round(total * num_steps)
        if end <= start:
            raise ConfigError(f'seq_len_phases: phase {length}:{fraction} gets no step of '
                              f'num_train_steps={num_steps}')
        phases.append(Phase(length, start, end))
        start = end
    return tuple(phases)


def parse_ramp(text: str, batch_size: int, num_steps: int) -> tuple[int, int]:
    """'256:0.05' -> (start size, ramp steps); (batch_size, 0) for ''. One-line ConfigError."""
    if not str(text).strip():
        return batch_size, 0
    try:
        start, fraction = str(text).split(':')
        start, fraction = int(start), float(fraction)
    except ValueError:
        start, fraction = 0, 0.0
    if not (1 <= start <= batch_size and 0 < fraction <= 1):
        raise ConfigError(f"batch_size_ramp: expected 'START:FRACTION' with 1 <= START <= "
                          f"batch_size ({batch_size}) and 0 < FRACTION <= 1 (e.g. '256:0.05'), "
                          f'got {text!r}')
    return start, round(fraction * num_steps)


class StepPlan:
    """Each step's (seq_len, batch size) and the rows and tokens before it."""

    def __init__(self, num_steps: int, batch_size: int, seq_len: int,
                 seq_len_phases: str = '', batch_size_ramp: str = ''):
        steps, size = num_steps, batch_size
        self.phases = parse_phases(seq_len_phases, steps) or (Phase(seq_len, 0, steps),)
        self.batch_size = size
        self.ramp_start, self.ramp_steps = parse_ramp(batch_size_ramp, size, steps)
        self._rows = self._tokens = np.zeros(1, np.int64)  # plain steps: past the "plan"
        if not self.active:
            return
        sizes = self._size(np.arange(steps, dtype=np.int64))
        lengths = np.concatenate([np.full(p.end - p.start, p.seq_len, np.int64)
                                  for p in self.phases])
        self._rows = np.concatenate([[0], np.cumsum(sizes)])
        self._tokens = np.concatenate([[0], np.cumsum(sizes * lengths)])

    @property
    def active(self) -> bool:
        """Whether any step differs from the plain (batch_size, seq_len) one."""
        return len(self.phases) > 1 or self.ramp_steps > 0

    def _size(self, step):  # int or int array
        start, ramp = self.ramp_start, max(self.ramp_steps, 1)
        stage = np.minimum(step, ramp) * RAMP_STAGES // ramp
        # Multiples of START above START: divisible wherever START is.
        size = start + (self.batch_size - start) * stage // RAMP_STAGES // start * start
        return np.where(step < self.ramp_steps, size, self.batch_size)

    def batch_size_at(self, step: int) -> int:
        """Global batch of the step taken after `step` steps."""
        return int(self._size(step))

    def seq_len(self, step: int) -> int:
        """Sequence length of the step taken after `step` steps."""
        for phase in self.phases:
            if step < phase.end:
                return phase.seq_len
        return self.phases[-1].seq_len

    def phase_index(self, step: int) -> int:
        return next((i for i, p in enumerate(self.phases) if step < p.end), len(self.phases) - 1)

    def sizes(self) -> list[int]:
        """The distinct batch sizes, in order."""
        return sorted({int(s) for s in self._size(np.arange(self.ramp_steps))} |
                      {self.batch_size})

    def rows_before(self, index: int) -> int:
        """Global rows read before data index `index` (past the plan: full batches)."""
        last = len(self._rows) - 1
        if index <= last:
            return int(self._rows[index])
        return int(self._rows[last]) + (index - last) * self.batch_size

    def tokens_at(self, step: int) -> int:
        """Tokens trained on by the end of `step` steps."""
        last = len(self._tokens) - 1
        if step <= last:
            return int(self._tokens[step])
        return int(self._tokens[last]) + (step - last) * self.batch_size * self.phases[-1].seq_len


class PlannedBatches:
    """Batches of the plan's shapes: one PretrainBatches per phase (its own data)."""

    def __init__(self, plan: StepPlan, phase_sources: list, seed: int, shard: tuple[int, int],
                 weights: list[float] | None = None):
        self.plan = plan
        # global_batch_size is unused here: batch_from takes each step's own size.
        self._phases = [PretrainBatches(sources, plan.ramp_start, seed, *shard, weights=weights)
                        for sources in phase_sources]

    def batch(self, index: int, offset: int) -> dict[str, np.ndarray]:
        """The batch of data index `index`, for step index - offset (NaN rollbacks skip
        batches: `offset` of them so far)."""
        step = index - offset
        source = self._phases[self.plan.phase_index(step)]
        return source.batch_from(self.plan.rows_before(index), self.plan.batch_size_at(step))

    def iterate(self, start: int, offset: int, prefetch: int = 4,
                num_threads: int = 2) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(data index, batch) from `start` on, read ahead by grain's threads."""
        indices = grain.MapDataset.range(start, np.iinfo(np.int64).max)
        batches = indices.map(lambda i: (i, self.batch(i, offset))).to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
        return iter(batches)


def budget_rates(optimizer: OptimizerConfig, num_steps: int, budget: Budget,
                 agree: Callable[[float], float] = float, clock: Callable[[], float] | None = None,
                 every: int = 1) -> Callable[[int], np.float32]:
    """step -> the learning rate of the step after it under schedule='budget', measured when
    the loop asks (right before it dispatches that step). `agree` makes processes use
    process 0's elapsed time (refreshed every `every` steps: a collective); `clock` replaces
    time.time (tests)."""
    last = {}

    def rate(step: int) -> np.float32:
        if not last or step % every == 0:
            now = None if clock is None else clock()
            last['elapsed'] = agree(budget.elapsed(now))
        now = budget.started + last['elapsed'] - budget.elapsed_before
        progress = budget.progress(step, num_steps, now)
        return np.float32(budget_learning_rate(optimizer, step, progress, num_steps))
    return rate


def learning_rates(optimizer: OptimizerConfig, num_steps: int, log_every: int, budget: Budget
                   ) -> Callable[[int], np.float32] | None:
    """The loop's learning_rate callback: the budget's rates under schedule='budget' (the
    same on every process; processes agree every `log_every` steps), else None (the step
    computes its own)."""
    if optimizer.schedule != 'budget':
        return None
    several = jax.process_count() > 1
    return budget_rates(optimizer, num_steps, budget,
                        agree_on_process_0 if several else float,
                        every=log_every if several else 1)


def agree_on_process_0(value: float) -> float:
    """Process 0's `value` on every process, to the microsecond (a collective)."""
    from engine.distributed import broadcast_int
    return broadcast_int(round(value * 1e6)) / 1e6


def feed(seed: int, plan: StepPlan, shard: tuple[int, int],
         batches: PretrainBatches, phase_sources: list | None,
         weights: list[float] | None = None) -> Callable[[int, int], Iterator[tuple[int, dict]]]:
    """(data index, offset) -> iterator of (index, batch) from there: the plan's shapes
    (phases, ramp) or the plain `batches`. `offset`: batches skipped by NaN rollbacks so
    far (the batch of data index i belongs to step i - offset)."""
    planned = plan.active and PlannedBatches(plan, phase_sources, seed, shard, weights)

    def iterate(index: int, offset: int) -> Iterator[tuple[int, dict]]:
        return planned.iterate(index, offset) if planned else batches.iterate(index)
    return iterate


def seq_len_of(batch: dict) -> int:
    return int(batch['input_ids'].shape[1])


def describe(plan: StepPlan) -> str:
    """One log line about the plan."""
    parts = [f'{p.seq_len} tokens for steps {p.start + 1}-{p.end}' for p in plan.phases]
    if plan.ramp_steps:
        parts.append(f'batch {plan.ramp_start} -> {plan.batch_size} over {plan.ramp_steps} '
                     f'steps (sizes {plan.sizes()})')
    return 'steps: ' + '; '.join(parts)
