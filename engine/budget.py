"""Run budgets that survive restarts: wall-clock (`max_runtime`) and tokens (`train_tokens`).

Each checkpoint's meta carries {'elapsed_seconds', 'tokens_seen'} as of its step, so a run
resumed after preemption continues the same budget: time spent in earlier attempts (set-up
included, up to their last checkpoint) and tokens already trained on both count. Time after
an attempt's last checkpoint is lost work and is not counted.

`progress` is the fraction of the run spent, by whichever budget ends first; the 'budget'
learning-rate schedule follows it (engine.optim.budget_learning_rate). Resumed, it goes on
from the checkpoint's elapsed time and tokens, so a restart does not rewind the schedule.
"""

import dataclasses
import math
import time
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Budget:
    max_runtime: float  # seconds over all attempts; 0 = no limit
    train_tokens: int  # tokens over all attempts; 0 = no limit
    tokens_per_step: int
    start_step: int  # the step this attempt starts from
    elapsed_before: float  # seconds spent by earlier attempts, up to start_step
    tokens_before: int  # tokens trained on up to start_step
    started: float  # time.time() when this attempt started
    # Tokens trained on by the end of step s when steps differ in size (sequence-length
    # phases, batch-size ramp); None: s * tokens_per_step.
    tokens_at: Callable[[int], int] | None = None

    @classmethod
    def resume(cls, cfg, meta: dict | None, start_step: int, tokens_per_step: int,
               started: float, tokens_at: Callable[[int], int] | None = None) -> 'Budget':
        """From the config and the meta of the checkpoint resumed (None: fresh start)."""
        saved = (meta or {}).get('budget', {})
        default = tokens_at(start_step) if tokens_at else start_step * tokens_per_step
        return cls(float(cfg.max_runtime), int(cfg.train_tokens), tokens_per_step, start_step,
                   float(saved.get('elapsed_seconds', 0.0)),
                   int(saved.get('tokens_seen', default)), started, tokens_at)

    def tokens(self, step: int) -> int:
        """Tokens trained on by the end of `step` (this attempt and the earlier ones)."""
        if self.tokens_at is None:
            return self.tokens_before + (step - self.start_step) * self.tokens_per_step
        return self.tokens_before + self.tokens_at(step) - self.tokens_at(self.start_step)

    def elapsed(self, now: float | None = None) -> float:
        """Seconds spent over all attempts at time.time() = `now` (default: now)."""
        return self.elapsed_before + (time.time() if now is None else now) - self.started

    def progress(self, step: int, num_steps: int, now: float | None = None) -> float:
        """The share of the run spent when `step` steps are done: max(elapsed / max_runtime,
        tokens / train_tokens, step / num_steps), at most 1."""
        shares = [step / max(num_steps, 1)]
        if self.max_runtime:
            shares.append(self.elapsed(now) / self.max_runtime)
        if self.train_tokens:
            shares.append(self.tokens(step) / self.train_tokens)
        return min(max(shares), 1.0)

    def meta(self, step: int) -> dict:
        """What a checkpoint at `step` records."""
        return {'elapsed_seconds': self.elapsed(), 'tokens_seen': self.tokens(step)}

    def last_step(self, num_steps: int) -> int:
        """The step this attempt may train to: num_steps, or fewer when the token budget
        ends first; start_step (nothing to train) when the time budget is already spent."""
        last = num_steps
        if self.train_tokens and self.tokens_at is None:
            left = max(self.train_tokens - self.tokens_before, 0)
            last = min(last, self.start_step + math.ceil(left / self.tokens_per_step))
        elif self.train_tokens:  # the first step whose end reaches the budget (bisection)
            low, high = self.start_step, num_steps
            while low < high:
                middle = (low + high) // 2
                low, high = ((middle + 1, high) if self.tokens(middle) < self.train_tokens
                             else (low, middle))
            last = min(last, low)
        if self.max_runtime and self.elapsed_before >= self.max_runtime:
            last = min(last, self.start_step)
        return max(last, min(self.start_step, num_steps))

    def deadline(self) -> float:
        """time.time() at which max_runtime is spent (0: no limit)."""
        if not self.max_runtime:
            return 0.0
        return self.started + self.max_runtime - self.elapsed_before
