"""The best validation evaluation of a fine-tuning run: its params in WORKDIR/best/, kept
consistent with the run's checkpoints so that a run killed at any point resumes.

Each checkpoint's meta names the best step of its own history (and the evaluations since
it without improvement, for `patience`). best/ keeps the params of every best step that a
checkpoint a run could resume from names, plus the current best; any other is deleted.
So, whatever the order in which the two directories reached the disk before a kill:
  - best/N saved, checkpoints/N not: the rerun resumes from an older checkpoint, whose
    best is still there; best/N is of steps about to be trained again, so it is deleted at
    resume (the same step is saved again when it is reached);
  - a checkpoint is saved only once the best save before it is on disk, so none names a
    best that is not;
  - a save killed midway leaves a temporary directory, which orbax ignores (and removes).
"""

from typing import Any

from engine.checkpoint import Checkpoints
from finetune import metrics


class BestTracker:
    """Keeps the best validation metric, saves its params, and counts patience."""

    def __init__(self, cfg, ckpts: Checkpoints, keep: int, resumed: tuple[int, dict | None],
                 named: dict[int, int]):
        """ckpts: best/. keep: how many checkpoints the run keeps. resumed: (step, meta) of
        the checkpoint resumed from, (0, None) for a fresh start. named: {checkpoint step:
        best step its meta names} of the run's checkpoints on disk."""
        self.cfg, self.ckpts, self.keep = cfg, ckpts, keep
        start_step, meta = resumed
        meta = meta or {}
        self.best = meta.get('best') or {'value': None, 'step': 0}
        self.bad_evals = int(meta.get('bad_evals', 0))
        self.named = dict(sorted(named.items()))
        for step in ckpts.all_steps():
            if step > start_step:  # of a history that is trained again from start_step
                ckpts.delete(step)
        self._prune()

    def update(self, step: int, state, results: dict) -> None:
        value = results[self.cfg.metric]
        if metrics.is_better(self.cfg.metric, value, self.best['value']):
            self.best = {'value': float(value), 'step': step}
            self.bad_evals = 0
            self.ckpts.save(step, {'params': state.params}, {'best': self.best})
            self._prune()
        else:
            self.bad_evals += 1

    def should_stop(self) -> bool:
        return bool(self.cfg.patience) and self.bad_evals >= self.cfg.patience

    def save_checkpoint(self, run_ckpts: Checkpoints, step: int, state: Any) -> None:
        """Saves the run's checkpoint of `step`, naming the current best, once that best is
        on disk; then forgets (and prunes) the bests only deleted checkpoints named."""
        self.ckpts.wait()
        run_ckpts.save(step, state, {'best': self.best, 'bad_evals': self.bad_evals})
        # The save waited for the previous one, whose completion deleted the checkpoints
        # beyond `keep`: on disk now are the `keep` before this one, and this one.
        self.named[step] = self.best['step']
        self.named = dict(sorted(self.named.items())[-(self.keep + 1):])
        self._prune()

    def settle(self, run_ckpts: Checkpoints) -> None:
        """Once training is over: waits for both directories' saves, then prunes the bests
        that only checkpoints deleted meanwhile named."""
        run_ckpts.wait()
        self.ckpts.wait()
        kept = set(run_ckpts.all_steps())
        self.named = {s: b for s, b in self.named.items() if s in kept}
        self._prune()

    def _prune(self) -> None:
        """Deletes the best steps that neither a kept checkpoint names nor are the best."""
        wanted = set(self.named.values()) | {self.best['step']}
        for step in self.ckpts.all_steps():
            if step not in wanted:
                self.ckpts.delete(step)
