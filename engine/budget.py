"""Run budgets that survive restarts: wall-clock (`max_runtime`) and tokens (`train_tokens`).

Each checkpoint's meta carries {'elapsed_seconds', 'tokens_seen'} as of its step, so a run
resumed after preemption continues the same budget: time spent in earlier attempts (set-up
included, up to their last checkpoint) and tokens already trained on both count. Time after
an attempt's last checkpoint is lost work and is not counted.
"""

import dataclasses
import math
import time


@dataclasses.dataclass(frozen=True)
class Budget:
    max_runtime: float  # seconds over all attempts; 0 = no limit
    train_tokens: int  # tokens over all attempts; 0 = no limit
    tokens_per_step: int
    start_step: int  # the step this attempt starts from
    elapsed_before: float  # seconds spent by earlier attempts, up to start_step
    tokens_before: int  # tokens trained on up to start_step
    started: float  # time.time() when this attempt started

    @classmethod
    def resume(cls, cfg, meta: dict | None, start_step: int, tokens_per_step: int,
               started: float) -> 'Budget':
        """From the config and the meta of the checkpoint resumed (None: fresh start)."""
        saved = (meta or {}).get('budget', {})
        return cls(float(cfg.max_runtime), int(cfg.train_tokens), tokens_per_step, start_step,
                   float(saved.get('elapsed_seconds', 0.0)),
                   int(saved.get('tokens_seen', start_step * tokens_per_step)), started)

    def meta(self, step: int) -> dict:
        """What a checkpoint at `step` records."""
        return {'elapsed_seconds': self.elapsed_before + time.time() - self.started,
                'tokens_seen': self.tokens_before + (step - self.start_step) * self.tokens_per_step}

    def last_step(self, num_steps: int) -> int:
        """The step this attempt may train to: num_steps, or fewer when the token budget
        ends first; start_step (nothing to train) when the time budget is already spent."""
        last = num_steps
        if self.train_tokens:
            left = max(self.train_tokens - self.tokens_before, 0)
            last = min(last, self.start_step + math.ceil(left / self.tokens_per_step))
        if self.max_runtime and self.elapsed_before >= self.max_runtime:
            last = min(last, self.start_step)
        return max(last, min(self.start_step, num_steps))

    def deadline(self) -> float:
        """time.time() at which max_runtime is spent (0: no limit)."""
        if not self.max_runtime:
            return 0.0
        return self.started + self.max_runtime - self.elapsed_before
