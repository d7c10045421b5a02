"""Metrics out of the loop: `metrics.jsonl`, TensorBoard events (tensorboardX, no TensorFlow)."""

import json
import math
import pathlib
from typing import Any

from tensorboardX import SummaryWriter


def _plain(value: Any) -> Any:
    """JSON-safe scalars: numpy/jax numbers become floats/ints, NaN stays readable."""
    if hasattr(value, 'item'):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricWriter:
    """Writes one JSON object per call to WORKDIR/metrics.jsonl and scalars to TensorBoard.

    Only the writing process (process 0) should hold an enabled writer.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        self.path = pathlib.Path(workdir) / 'metrics.jsonl'
        self._truncate_after(resume_step)
        self._file = self.path.open('a')
        self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint: they will be logged again."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get('step', 0) <= step]
        self.path.write_text(''.join(line + '\n' for line in keep))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + '\n')
        self._file.flush()
        for key, value in record.items():
            if key != 'step' and isinstance(value, int | float):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
