"""The compute curve: a benchmark's average score against the pretraining compute spent.

    python -m studies.compute_curve --out runs/curve \\
        --point bert,none,runs/bench_bert,scratch \\
        --point bert,runs/tiny_3000,runs/bench_bert,finetune \\
        --point modern,runs/modern@1050,runs/bench_1050,finetune

A point is `SERIES,PRETRAINING,BENCH,METHOD`: the curve it belongs to; the pretraining
workdir (`@STEP` for one of its checkpoints, default the latest; `none` = from scratch, no
pretraining); an `evaluate` suite workdir (its results_tasks.csv); and the row of that
table to read (`finetune`, `probe`, `scratch`). Pretraining compute comes from the
checkpoint itself: its step, the tokens and wall-clock seconds its run had spent (the
budget meta every checkpoint carries, set-up included) and model FLOPs (models/flops.py).

Writes OUT/compute_curve.md and .csv (a row per point: steps, tokens, FLOPs, minutes,
held-out MLM loss at that step where logged, the benchmark average mean ± std over seeds)
and OUT/compute_curve.png (the average against FLOPs, one line per series, the TF-IDF
row of the first table that has one as a dashed line) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib

import ml_collections
from etils import epath

from engine import extras
from engine.checkpoint import read_meta_and_shapes
from engine.rundir import RunDir
from pretrain import objective
from pretrain.objective import ObjectiveConfig
from pretrain.sections import bert_config, masking_config

REGIME = 'low-label (1k labels)'
BASELINE = 'tfidf'


@dataclasses.dataclass(frozen=True)
class Point:
    series: str
    steps: int
    tokens: int
    flops: float
    minutes: float
    eval_loss: float | None
    mean: float
    std: float
    seeds: int


def parse_point(spec: str) -> tuple[str, str, int | None, str, str]:
    """'SERIES,PRETRAINING[@STEP],BENCH,METHOD' -> (series, pretraining, step, bench, method)."""
    parts = [p.strip() for p in spec.split(',')]
    if len(parts) != 4 or not all(parts):
        raise ValueError(f'--point {spec!r}: expected SERIES,PRETRAINING[@STEP],BENCH,METHOD')
    series, pretraining, bench, method = parts
    path, _, step = pretraining.partition('@')
    if step and not step.isdigit():
        raise ValueError(f'--point {spec!r}: @STEP must be a number, got {step!r}')
    return series, path, int(step) if step else None, bench, method


def bench_average(bench: str, method: str, regime: str = REGIME) -> tuple[float, float, int]:
    """(mean, std, seeds) of `method`'s average in a suite's results_tasks.csv."""
    path = pathlib.Path(bench) / 'results_tasks.csv'
    if not path.is_file():
        raise ValueError(f'{bench}: no results_tasks.csv; run the bench suite there first')
    with path.open() as f:
        for row in csv.DictReader(f):
            if (row['regime'], row['method'], row['task']) == (regime, method, 'average'):
                return float(row['mean']), float(row['std']), int(row['seeds'])
    raise ValueError(f'{path}: no {method!r} average in the {regime!r} table')


def pretraining_compute(workdir: str, step: int | None) -> tuple[int, int, float, float]:
    """(steps, tokens, model FLOPs, wall seconds) a pretraining run had spent at `step`."""
    run = RunDir(epath.Path(workdir))
    step = step if step is not None else run.latest_step()
    if step is None:
        raise ValueError(f'{workdir}: no checkpoint')
    meta, _ = read_meta_and_shapes(run.checkpoints, step)
    cfg = ml_collections.ConfigDict(meta['config'])
    budget = meta.get('budget', {})
    model_cfg = bert_config(cfg)
    model = objective.build_model(ObjectiveConfig.from_config(cfg, model_cfg), model_cfg)
    max_predictions = masking_config(cfg, cfg.model.vocab_size).max_predictions
    flops = step * objective.flops_per_step(model, cfg.batch_size, cfg.seq_len,
                                            max_predictions)  # as pretraining counted them
    tokens = int(budget.get('tokens_seen', step * cfg.batch_size * cfg.seq_len))
    return step, tokens, float(flops), float(budget.get('elapsed_seconds', math.nan))


def eval_loss_at(workdir: str, step: int) -> float | None:
    """The held-out MLM loss logged at `step` (metrics.jsonl), if any."""
    path = RunDir(epath.Path(workdir)).metrics_file
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get('step') == step and 'eval_loss' in row:
            return float(row['eval_loss'])
    return None


def measure(spec: str) -> Point:
    series, pretraining, step, bench, method = parse_point(spec)
    mean, std, seeds = bench_average(bench, method)
    if pretraining.lower() == 'none':
        return Point(series, 0, 0, 0.0, 0.0, None, mean, std, seeds)
    steps, tokens, flops, seconds = pretraining_compute(pretraining, step)
    return Point(series, steps, tokens, flops, seconds / 60, eval_loss_at(pretraining, steps),
                 mean, std, seeds)


def baseline(points_specs: list[str]) -> float | None:
    """The TF-IDF average of the first bench table that has one."""
    for spec in points_specs:
        try:
            return bench_average(parse_point(spec)[3], BASELINE)[0]
        except ValueError:
            continue
    return None


def write_tables(out: pathlib.Path, points: list[Point], tfidf: float | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / 'compute_curve.csv').open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(Point)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(p) for p in points)
    lines = ['| series | pretraining steps | tokens | model FLOPs | wall minutes | '
             'held-out MLM loss | benchmark average |', '|---|---:|---:|---:|---:|---:|---:|']
    for p in points:
        loss = f'{p.eval_loss:.3f}' if p.eval_loss is not None else ''
        lines.append(f'| {p.series} | {p.steps:,} | {p.tokens / 1e6:.1f}M | {p.flops:.2g} | '
                     f'{p.minutes:.1f} | {loss} | {p.mean:.3f} ± {p.std:.3f} ({p.seeds}) |')
    if tfidf is not None:
        lines.append(f'| TF-IDF (no pretraining) | | | | | | {tfidf:.3f} |')
    (out / 'compute_curve.md').write_text('\n'.join(lines) + '\n')


def chart(out: pathlib.Path, points: list[Point], tfidf: float | None) -> pathlib.Path | None:
    try:
        import matplotlib  # an optional extra, only for the picture
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'chart skipped: {extras.install_hint("matplotlib")} to draw compute_curve.png')
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for series in dict.fromkeys(p.series for p in points):
        members = sorted((p for p in points if p.series == series), key=lambda p: p.flops)
        ax.errorbar([p.flops for p in members], [p.mean for p in members],
                    yerr=[p.std for p in members], marker='o', capsize=3, label=series)
    if tfidf is not None:
        ax.axhline(tfidf, linestyle='--', color='gray', label='TF-IDF + logistic/ridge')
    ax.set_xlabel('pretraining compute (model FLOPs; 0 = from scratch)')
    ax.set_ylabel('benchmark average (1k labels)')
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / 'compute_curve.png'
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--point', action='append', required=True,
                        help='SERIES,PRETRAINING[@STEP],BENCH,METHOD (repeat)')
    parser.add_argument('--out', required=True, help='directory for the table and chart')
    args = parser.parse_args(argv)
    try:
        points = [measure(spec) for spec in args.point]
    except ValueError as e:
        raise SystemExit(f'compute_curve: {e}') from None
    tfidf = baseline(args.point)
    out = pathlib.Path(args.out)
    write_tables(out, points, tfidf)
    chart(out, points, tfidf)
    print((out / 'compute_curve.md').read_text(), end='')


if __name__ == '__main__':
    main()
