"""A suite's method x task table of each task's own metric, with averages over tasks.

`launch.py evaluate` with `task_table=True` (the `bench` suite) writes, next to
results.md/.csv (every metric, one row per task and variant):

  results_tasks.md   one table per training regime (all labels; tasks named *SUFFIX, e.g.
                     *_1k, for the low-label one): a row per method (baselines, variants),
                     a column per task with its metric (`metric` of its config: F1 for
                     classification, Pearson for regression in the bench; the suite's
                     headline_metrics.TASK where set, e.g. GLUE's MRPC F1), and the
                     average over tasks.
  results_tasks.csv  the same numbers (mean, std, seeds per cell).
  results_tasks.png  a bar chart of it, if matplotlib is installed (an optional extra,
                     imported here only; without it a one-line hint is printed instead).

Cells are the mean ± sample standard deviation over seeds. The average is taken per seed
over the regime's tasks (only seeds every task has finished), then mean ± std over seeds.
"""

from __future__ import annotations

import csv
import math
import pathlib

import numpy as np

from engine import extras

MATPLOTLIB_HINT = f'chart skipped: {extras.install_hint("matplotlib")} to draw results_tasks.png'
AVERAGE = 'average'


def _stats(values: list[float]) -> tuple[float, float, int]:
    arr = np.asarray(values, np.float64)
    if not arr.size:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0, int(arr.size)


def regimes(tasks: list[str], low_suffix: str) -> list[tuple[str, list[str]]]:
    """[(regime title, its tasks)]: tasks without `low_suffix`, then those with it."""
    full = [t for t in tasks if not (low_suffix and t.endswith(low_suffix))]
    low = [t for t in tasks if low_suffix and t.endswith(low_suffix)]
    out = [('all training labels', full)] if full else []
    if low:
        out.append((f'low-label ({low_suffix.lstrip("_")} labels)', low))
    return out


def summarize(rows: list[dict], tasks: list[str], methods: list[str],
              low_suffix: str) -> list[dict]:
    """One row per (regime, method): {'regime', 'method', TASK: (mean, std, n), ...,
    'average': (mean, std, n)} from per-run rows {'task', 'variant', 'seed', 'score'}."""
    scores: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if 'score' in r:
            scores.setdefault((r['task'], r['variant']), {})[int(r['seed'])] = r['score']
    table = []
    for title, group in regimes(tasks, low_suffix):
        for method in methods:
            if not any((t, method) in scores for t in group):
                continue
            out: dict = {'regime': title, 'method': method}
            for t in group:
                out[t] = _stats(list(scores.get((t, method), {}).values()))
            per_task = [scores.get((t, method), {}) for t in group]
            seeds = set.intersection(*(set(s) for s in per_task)) if per_task else set()
            out[AVERAGE] = _stats([float(np.mean([s[seed] for s in per_task]))
                                   for seed in sorted(seeds)])
            table.append(out)
    return table


def _cell(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    return '—' if not n else f'{mean:.3f} ± {std:.3f}'


def write(workdir: pathlib.Path, table: list[dict], metric_of: dict[str, str]) -> None:
    """results_tasks.md and results_tasks.csv (and the chart, see `chart`)."""
    lines, records = [], []
    for title in dict.fromkeys(r['regime'] for r in table):
        members = [r for r in table if r['regime'] == title]
        tasks = [k for k in members[0] if k not in ('regime', 'method', AVERAGE)]
        head = [f'{t} ({metric_of.get(t, "?")})' for t in tasks] + [AVERAGE]
        lines += [f'### {title}', '', '| method | ' + ' | '.join(head) + ' |',
                  '|---|' + '---:|' * len(head)]
        for r in members:
            cells = [_cell(r[t]) for t in tasks] + [f'**{_cell(r[AVERAGE])}**']
            lines.append(f"| {r['method']} | " + ' | '.join(cells) + ' |')
            for t in [*tasks, AVERAGE]:
                mean, std, n = r[t]
                records.append({'regime': title, 'method': r['method'], 'task': t,
                                'metric': metric_of.get(t, 'mean'), 'mean': mean,
                                'std': std, 'seeds': n})
        lines.append('')
    (workdir / 'results_tasks.md').write_text('\n'.join(lines))
    with open(workdir / 'results_tasks.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['regime', 'method', 'task', 'metric', 'mean',
                                               'std', 'seeds'])
        writer.writeheader()
        writer.writerows(records)


def chart(workdir: pathlib.Path, table: list[dict]) -> pathlib.Path | None:
    """results_tasks.png: per regime, grouped bars (method) per task and the average, with
    the standard deviation as error bars. None (and a printed hint) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print(MATPLOTLIB_HINT, flush=True)
        return None
    titles = list(dict.fromkeys(r['regime'] for r in table))
    fig, axes = plt.subplots(len(titles), 1, figsize=(11, 3.6 * len(titles)), squeeze=False)
    for ax, title in zip(axes[:, 0], titles, strict=True):
        members = [r for r in table if r['regime'] == title]
        tasks = [k for k in members[0] if k not in ('regime', 'method')]
        width = 0.8 / len(members)
        for i, r in enumerate(members):
            x = np.arange(len(tasks)) + (i - (len(members) - 1) / 2) * width
            means = [0.0 if not r[t][2] else r[t][0] for t in tasks]
            ax.bar(x, means, width, yerr=[r[t][1] if r[t][2] else 0 for t in tasks],
                   label=r['method'], capsize=2)
        ax.set_xticks(np.arange(len(tasks)), tasks, rotation=15)
        ax.set_title(title)
        ax.set_ylabel("test score (each task's metric)")
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.0)
        ax.legend(fontsize=8, ncol=len(members))
    fig.tight_layout()
    path = workdir / 'results_tasks.png'
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
