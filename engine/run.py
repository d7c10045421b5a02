"""The one run harness of every training stage (pretraining, fine-tuning).

A stage checks its config, then calls `run_stage` with a body. The harness makes what every
stage shares, in the same order for each: the checks of the profiler window and W&B (one
line, before any work), the workdir (made absolute, reachable, created), SIGTERM/Ctrl-C
handling, the workdir lock, and a `Run` through which the body opens its checkpoints and
metric writer and runs the loop; whatever the body opened is closed on the way out, on
success, error or preemption alike. The stage supplies what differs: its state, step,
evaluation and what it writes at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax
from etils import epath

from engine import mesh as mesh_lib
from engine.checkpoint import Checkpoints
from engine.errors import ConfigError
from engine.hardware import total_peak_flops
from engine.lock import workdir_lock
from engine.loop import LoopCallbacks, LoopConfig, SigtermFlag, parse_profile_steps, run_loop
from engine.metrics_writer import MetricWriter, require_wandb
from engine.paths import open_workdir
from engine.rundir import RunDir

T = TypeVar('T')


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The part of a stage's config the harness reads, read once at the stage's entry."""

    stage: str  # 'pretrain' | 'finetune': the lock's command name
    log_every: int
    tokens_per_step: int
    profile: tuple[int, int] | None = None  # profile_steps, parsed
    wandb: dict | None = None  # the `wandb` section ({'project': ...}) or None
    peak_flops_per_device: float = 0.0  # 0: the known peak of the chip (engine/hardware.py)
    run_config: dict | None = None  # the resolved config, logged to TensorBoard and W&B

    @classmethod
    def from_config(cls, stage: str, cfg: Any) -> RunSettings:
        """From a stage's ConfigDict; a one-line ConfigError for bad profile_steps or a
        W&B project without wandb installed (before any work)."""
        wandb = dict(cfg.get('wandb') or {}) or None
        require_wandb((wandb or {}).get('project'))
        return cls(stage=stage, log_every=cfg.log_every_steps,
                   tokens_per_step=cfg.batch_size * cfg.seq_len,
                   profile=parse_profile_steps(cfg.get('profile_steps', '')), wandb=wandb,
                   peak_flops_per_device=cfg.peak_flops_per_device, run_config=cfg.to_dict())


def run_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> jax.sharding.Mesh:
    """The configured mesh over `devices` (default: this machine's), or one line naming
    mesh.shape."""
    try:
        return mesh_lib.make_mesh(shape, axes, devices=devices)
    except ValueError as e:
        raise ConfigError(f'mesh.shape: {e}') from None


def check_batch_split(batch_size: int, data_parallel: int, grad_accum_steps: int) -> None:
    """The global batch splits evenly over the data-parallel devices and micro-batches."""
    if grad_accum_steps < 1:
        raise ConfigError(f'grad_accum_steps: must be >= 1, got {grad_accum_steps}')
    if batch_size % (data_parallel * grad_accum_steps):
        raise ConfigError(
            f'batch_size: {batch_size} is not divisible by the data-parallel size '
            f'{data_parallel} x grad_accum_steps {grad_accum_steps}')


class Run:
    """One stage's run with its workdir held: what it opens is closed when it ends."""

    def __init__(self, settings: RunSettings, workdir: epath.Path, sigterm: SigtermFlag):
        self.settings = settings
        self.workdir = workdir
        self.rundir = RunDir(workdir)
        self.sigterm = sigterm
        self.main = jax.process_index() == 0
        self._open: list = []  # closed last-opened first
        self.writer: MetricWriter | None = None

    def checkpoints(self, directory: epath.Path, keep: int | None) -> Checkpoints:
        """A checkpoint manager of this run (closed with it)."""
        ckpts = Checkpoints(str(directory), keep=keep)
        self._open.append(ckpts)
        return ckpts

    def open_writer(self, resume_step: int) -> MetricWriter:
        """metrics.jsonl, TensorBoard (and W&B) from `resume_step` on (closed with the run)."""
        s = self.settings
        self.writer = MetricWriter(str(self.workdir), enabled=self.main, resume_step=resume_step,
                                   wandb=s.wandb, run_config=s.run_config)
        self._open.append(self.writer)
        return self.writer

    def loop_config(self, **stage: Any) -> LoopConfig:
        """The LoopConfig with the shared half filled in; `stage`: the rest (num_steps,
        eval_every, checkpoint_every, flops_per_step, ...)."""
        s = self.settings
        return LoopConfig(
            log_every=s.log_every, tokens_per_step=s.tokens_per_step,
            peak_flops=total_peak_flops(s.peak_flops_per_device), is_main=self.main,
            profile=s.profile, profile_dir=self.writer.profile_dir if self.writer else '',
            **stage)

    def loop(self, state: Any, batches: Iterator, start_step: int, loop_cfg: LoopConfig,
             callbacks: LoopCallbacks) -> Any:
        """The shared loop (engine/loop.py) under this run's signal flag."""
        return run_loop(state, batches, start_step, loop_cfg, callbacks, self.sigterm)

    def close(self) -> None:
        """Closes what the run opened (waiting for checkpoint saves); safe to call twice."""
        opened, self._open = self._open, []
        errors = []
        for item in reversed(opened):
            try:
                item.close()
            except Exception as e:  # close the rest; the first failure is raised after
                errors.append(e)
        if errors:
            raise errors[0]


def run_stage(settings: RunSettings, workdir: str, body: Callable[[Run], T],
              done: Callable[[epath.Path], T | None] | None = None) -> T:
    """Opens the workdir, installs the signal flag, takes the lock and runs `body(run)`;
    returns what it returns. `done(workdir)`: the result of a run that is already
    complete (then nothing is locked or written), or None."""
    path = open_workdir(workdir)  # a local path made absolute, or gs://...
    if done is not None:
        result = done(path)
        if result is not None:
            return result
    # From here on SIGTERM and Ctrl-C save and end the run resumably; the previous handlers
    # are restored on the way out.
    with SigtermFlag() as sigterm, workdir_lock(path, settings.stage):
        run = Run(settings, path, sigterm)
        try:
            return body(run)
        finally:
            run.close()
