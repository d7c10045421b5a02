"""Metrics out of the loop: `metrics.jsonl`, TensorBoard events (tensorboardX, no TensorFlow).

TensorBoard groups the scalars as `train/KEY`, `eval/KEY` (`eval_loss` -> `eval/loss`),
`old_eval/KEY` and `perf/KEY` (tokens_per_sec, steps_per_sec, mfu), and shows the run's
config as text; metrics.jsonl keeps the keys as they are. `curves.png` (engine/curves.py,
with the [plots] extra) is redrawn from metrics.jsonl after an evaluation, at most every
`redraw_every_s` seconds, and on close.

Both files are appended to, which cloud storage cannot do: for a gs:// workdir they are
written in a local staging directory and uploaded whole at most every `upload_every_s`
seconds and on close (SIGTERM included). A crash loses at most that much of the log; the
resumed run logs the steps after its checkpoint again anyway.

Optionally (`--config.wandb.project=NAME`) every record also goes to Weights & Biases; the
run's W&B id is kept in WORKDIR/wandb_id.txt so that a resumed run continues the same W&B
run. `wandb` is imported only then.
"""

import json
import math
import pathlib
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

from engine import curves, extras
from engine.paths import absolute_path, is_remote
from engine.rundir import METRICS_FILENAME, TENSORBOARD_DIRNAME, WANDB_ID_FILENAME


def _plain(value: Any) -> Any:
    """JSON-safe scalars: numpy/jax numbers become floats/ints, NaN stays readable."""
    if hasattr(value, 'item'):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


PERF_KEYS = ('tokens_per_sec', 'steps_per_sec', 'mfu')


def tensorboard_tag(key: str) -> str:
    """A metrics key -> its TensorBoard tag: `eval/loss` for `eval_loss`, `old_eval/loss`
    for `old_eval_loss`, `perf/mfu` for speed measures, else `train/KEY`."""
    for prefix in ('old_eval', 'eval'):
        if key.startswith(f'{prefix}_'):
            return f'{prefix}/{key[len(prefix) + 1:]}'
    return f"{'perf' if key in PERF_KEYS else 'train'}/{key}"


def require_wandb(project: str):
    """The `wandb` module when a W&B project is set (None when not); a one-line ConfigError
    if it is not installed. Called before training starts, so the error comes early."""
    if not project:
        return None
    return extras.require('wandb', f'wandb.project={project!r}')


def _wandb_id(workdir) -> str:
    """This workdir's W&B run id: read from WORKDIR/wandb_id.txt, or made and stored there."""
    path = absolute_path(workdir) / WANDB_ID_FILENAME
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    path.write_text(run_id + '\n')
    return run_id


class MetricWriter:
    """Writes one JSON object per call to WORKDIR/metrics.jsonl and scalars to TensorBoard.

    Only the writing process (process 0) should hold an enabled writer. `wandb` (a config
    section with project, entity, name; project '' = off) also logs each record to W&B,
    with `run_config` as the W&B run's config.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0,
                 upload_every_s: float = 30.0, wandb: Any = None,
                 run_config: dict | None = None, redraw_every_s: float = 30.0):
        self.enabled = enabled
        self._wandb, self.tensorboard_dir = None, None
        if not enabled:
            return
        self._remote = absolute_path(workdir) if is_remote(workdir) else None
        local = (pathlib.Path(tempfile.mkdtemp(prefix='bertjax-logs-')) if self._remote
                 else pathlib.Path(workdir))
        self.path = local / METRICS_FILENAME
        if self._remote and (self._remote / METRICS_FILENAME).exists():
            self.path.write_bytes((self._remote / METRICS_FILENAME).read_bytes())
        self._truncate_after(resume_step)
        self._file = self.path.open('a')
        # Imported here: tensorboardX imports torch whenever it is installed (~2.4 s), which
        # `--help`, config errors, dry runs and the other processes need not pay.
        from tensorboardX import SummaryWriter
        # Local; for a gs:// workdir uploaded with the events (profiler traces go under it).
        self.tensorboard_dir = local / TENSORBOARD_DIRNAME
        self._tb = SummaryWriter(str(self.tensorboard_dir))
        if run_config:
            text = json.dumps(run_config, indent=2, sort_keys=True, default=str)
            self._tb.add_text('config', f'```json\n{text}\n```', resume_step)
        self._upload_every_s, self._uploaded_at = upload_every_s, time.monotonic()
        self._redraw_every_s, self._drawn_at = redraw_every_s, None
        if wandb is not None and wandb.get('project'):
            module = require_wandb(wandb['project'])
            self._wandb = module.init(
                project=wandb['project'], entity=wandb.get('entity') or None,
                name=wandb.get('name') or absolute_path(workdir).name,
                config=run_config or {}, dir=str(local), resume='allow',
                id=_wandb_id(workdir))

    @property
    def profile_dir(self) -> str:
        """Where the loop's profiler window writes its trace ('' for a disabled writer):
        tensorboard/profile of the local (or, for gs://, staging) directory."""
        return str(self.tensorboard_dir / 'profile') if self.tensorboard_dir else ''

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint: they will be logged again.
        A line that is not JSON (a write cut short by a crash or a full disk) is dropped
        too, with a warning, instead of blocking the resume."""
        if not self.path.exists():
            return
        keep, torn = [], 0
        for line in self.path.read_text(errors='replace').splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                torn += 1
                continue
            if isinstance(record, dict) and record.get('step', 0) <= step:
                keep.append(line)
        if torn:
            print(f'warning: {METRICS_FILENAME}: dropped {torn} unreadable line(s), a write cut '
                  'short', file=sys.stderr, flush=True)
        self.path.write_text(''.join(line + '\n' for line in keep))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()
        for key, value in record.items():
            if key != 'step' and isinstance(value, int | float):
                self._tb.add_scalar(tensorboard_tag(key), value, step)
        self._tb.flush()
        if any(k.startswith('eval_') for k in record):
            self._redraw()
        if self._wandb is not None:
            self._wandb.log({tensorboard_tag(k): v for k, v in record.items()
                             if k != 'step' and isinstance(v, int | float)}, step=int(step))
        if self._remote and time.monotonic() - self._uploaded_at >= self._upload_every_s:
            self._upload()

    def _redraw(self, force: bool = False) -> None:
        """curves.png from metrics.jsonl, at most every redraw_every_s (always when forced)."""
        now = time.monotonic()
        if not force and self._drawn_at is not None and (
                now - self._drawn_at < self._redraw_every_s):
            return
        self._drawn_at = now
        try:
            curves.draw_run(self.path.parent)
        except Exception as e:  # a picture is never worth a run: say so once, go on
            if self._redraw_every_s != math.inf:
                print(f'warning: {curves.CURVES_FILENAME} not drawn ({type(e).__name__}: {e})',
                      file=sys.stderr, flush=True)
            self._redraw_every_s = math.inf

    def _upload(self) -> None:
        """Copies the staged files over the workdir's (this run's event file is new; earlier
        runs' event files there are left as they are)."""
        local = self.path.parent
        events = sorted(p for p in (local / TENSORBOARD_DIRNAME).rglob('*') if p.is_file())
        picture = [p for p in [local / curves.CURVES_FILENAME] if p.exists()]
        for file in [self.path, *events, *picture]:
            target = self._remote / file.relative_to(local)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
        self._uploaded_at = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
            self._redraw(force=True)
            if self._wandb is not None:
                self._wandb.finish()
                self._wandb = None
            if self._remote:
                self._upload()
                shutil.rmtree(self.path.parent, ignore_errors=True)
