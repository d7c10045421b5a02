"""Curves of a run as a picture: `curves.png` beside `metrics.jsonl` (train and eval loss,
the other eval metrics, the learning rate, against step), and several runs overlaid
(`launch.py plot`). matplotlib is an optional extra ([plots]): without it nothing is drawn
and the caller gets None."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence

from engine.rundir import CURVES_FILENAME, METRICS_FILENAME

LOSS_KEYS = ('loss', 'eval_loss')
SKIPPED = ('step', 'learning_rate', 'tokens_per_sec', 'steps_per_sec', 'mfu', 'grad_norm',
           'rollback_to', 'skipped_batches')


def read_records(metrics_file: str | pathlib.Path) -> list[dict]:
    """metrics.jsonl's records (unreadable lines, e.g. a torn last line, skipped)."""
    records = []
    for line in pathlib.Path(metrics_file).read_text(errors='replace').splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and 'step' in record:
            records.append(record)
    return records


def series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry a finite number under `key`."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(int(r['step']))
            values.append(float(v))
    return steps, values


def eval_metric_keys(records: Sequence[dict]) -> list[str]:
    """The eval metrics other than the loss (e.g. eval_accuracy, eval_mlm_accuracy)."""
    keys = {k for r in records for k in r if k.startswith('eval_') and k != 'eval_loss'}
    return sorted(k for k in keys if series(records, k)[0])


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use('Agg')  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def draw_run(workdir: str | pathlib.Path, output: str | pathlib.Path | None = None
             ) -> pathlib.Path | None:
    """Draws WORKDIR/curves.png (or `output`) from WORKDIR/metrics.jsonl; None without
    matplotlib or records."""
    workdir = pathlib.Path(workdir)
    records = read_records(workdir / METRICS_FILENAME)
    plt = _pyplot()
    if plt is None or not records:
        return None
    metrics = eval_metric_keys(records)
    panels = [('loss', LOSS_KEYS), *((k, (k,)) for k in metrics[:2]),
              ('learning rate', ('learning_rate',))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker='o' if key.startswith('eval_') else None,
                        markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
    fig.suptitle(workdir.name, fontsize=10)
    fig.tight_layout()
    target = pathlib.Path(output) if output else workdir / CURVES_FILENAME
    tmp = target.with_name(f'.{target.name}.tmp.png')
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(target)  # a reader never sees half a picture
    return target


def draw_overlay(workdirs: Sequence[str | pathlib.Path], output: str | pathlib.Path,
                 keys: Sequence[str] = ('loss', 'eval_loss')) -> pathlib.Path | None:
    """One panel per key, one line per run (labelled by its folder name); None without
    matplotlib. A ValueError when a run has no metrics.jsonl or none of the keys."""
    runs = []
    for w in workdirs:
        path = pathlib.Path(w) / METRICS_FILENAME
        if not path.is_file():
            raise ValueError(f'{w}: no {METRICS_FILENAME} (not a run directory?)')
        runs.append((pathlib.Path(w), read_records(path)))
    for key in keys:
        if not any(series(records, key)[0] for _, records in runs):
            raise ValueError(f'no run logged {key!r}')
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for workdir, records in runs:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker='o' if key.startswith('eval_') else None,
                        markersize=3, label=workdir.name)
        ax.set_title(key)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
