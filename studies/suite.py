"""Multi-seed evaluation: `run(config, workdir)` for `launch.py evaluate`.

Every (task, variant, seed) is an ordinary fine-tuning run in its own workdir
`WORKDIR/TASK/VARIANT/seed_N/`, trained by `finetune.train.run`; a finished run (its
results.json exists) is read back rather than retrained, and an interrupted one resumes
from its checkpoint, so re-running the same command continues where it stopped. The
tables (`results.md`, `results.csv`) are rewritten after every run.

Baselines (`baselines`: 'majority', 'tfidf'; studies/baselines.py) run first, on the same
task configs and seeds, each into `WORKDIR/TASK/BASELINE/seed_N/results.json`, and join
the tables as rows of their own. With `task_table`, studies/task_table.py also writes the
method x task table of each task's metric with averages (results_tasks.md/.csv/.png):
its `metric`, or the suite's headline_metrics.TASK (e.g. 'f1_binary', GLUE's F1).
"""

import csv
import json
import math
import pathlib
import re
import shlex
from collections.abc import Iterator

import ml_collections
import numpy as np

from engine.config_cli import apply_overrides, load_config
from engine.errors import ConfigError
from engine.paths import local_dir
from engine.rundir import RunDir
from finetune import metrics as finetune_metrics
from finetune import train as finetune_train
from studies import baselines, task_table
from text.tokenizer import MODEL_FILENAME, tokenizer_file

FINETUNE_CONFIG = 'configs/finetune.py'
# Task and variant names become folders (WORKDIR/TASK/VARIANT/): no '/', no leading '.'.
_NAME = re.compile(r'[A-Za-z0-9_-][A-Za-z0-9_.-]*')
BINARY_F1 = 'f1_binary'  # derived from the confusion matrix, see binary_f1


def _tokens(text: str, what: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise ConfigError(f'{what}: {e}') from None


def _apply_items(cfg: ml_collections.ConfigDict, items: list[str], what: str) -> None:
    if any('=' not in item for item in items):
        raise ConfigError(f'{what}: expected key=value items, got {items}')
    apply_overrides(cfg, items)


def task_config(text: str, what: str, *first: str) -> ml_collections.ConfigDict:
    """'FINETUNE_CONFIG_ARG key=value ...' (a suite's task, a search's base) -> its
    fine-tuning config; the `first` key=value overrides go before the text's own."""
    tokens = _tokens(text, what)
    if not tokens:
        raise ConfigError(f"{what}: empty; expected 'FINETUNE_CONFIG_ARG key=value ...'")
    cfg = load_config(f'{FINETUNE_CONFIG}:{tokens[0]}')
    apply_overrides(cfg, list(first))
    _apply_items(cfg, tokens[1:], what)
    return cfg


def run_config(suite: ml_collections.ConfigDict, task: str, variant: str,
               seed: int) -> ml_collections.ConfigDict:
    """The fine-tuning config of one run: the task's config arg and overrides, the suite's
    init_from, the variant's overrides, and the seed."""
    cfg = task_config(suite.tasks[task], f'tasks.{task}', f'init_from={suite.init_from}',
                      f'seed={seed}')
    items = _tokens(suite.variants[variant], f'variants.{variant}')
    _apply_items(cfg, items, f'variants.{variant}')
    if cfg.init_from.lower() == 'none' and _pretrained(suite):
        # From scratch, the pretrained run's model: its architecture (this config's dropout
        # and pooling; the variant's own overrides applied again on top) and its tokenizer
        # (spm.model, or wordpiece.json for an imported WordPiece BERT): only weights differ.
        run = RunDir(suite.init_from)
        if run.config_file.exists():  # a missing one is reported by the pretrained runs
            _take_architecture(cfg, run.read_config()['model'])
            _apply_items(cfg, items, f'variants.{variant}')
        if not cfg.tokenizer_model:
            cfg.tokenizer_model = (tokenizer_file(suite.init_from)
                                   or str(pathlib.Path(suite.init_from) / MODEL_FILENAME))
    return cfg


# Fine-tuning's own model keys: kept when a scratch run takes a pretrained architecture.
FINETUNE_MODEL_KEYS = ('dropout_rate', 'attention_dropout_rate', 'pooling')


def _take_architecture(cfg: ml_collections.ConfigDict, pretrained: dict) -> None:
    kept = {k: cfg.model[k] for k in FINETUNE_MODEL_KEYS if k in cfg.model}
    with cfg.unlocked():
        cfg.model = ml_collections.ConfigDict({**pretrained, **kept})


def _pretrained(suite) -> bool:
    return bool(suite.init_from) and suite.init_from.lower() != 'none'


def _tasks(suite) -> list[str]:
    return [t for t in suite.tasks if suite.tasks[t].strip()]  # '' drops a task


def _runs(suite) -> Iterator[tuple[str, str, int]]:
    if suite.get('baselines_only', False):
        return
    for task in _tasks(suite):
        for variant in suite.variants:
            for seed in suite.seeds:
                yield task, variant, int(seed)


def _baselines(suite) -> tuple[str, ...]:
    return tuple(suite.get('baselines', ()))


def _methods(suite) -> list[str]:
    """Table rows: baselines, then variants (the bench's in increasing use of pretraining)."""
    first = [v for v in ('scratch', 'probe', 'finetune') if v in suite.variants]
    return [*_baselines(suite), *first, *(v for v in suite.variants if v not in first)]


def baseline_config(suite: ml_collections.ConfigDict, task: str,
                    seed: int) -> ml_collections.ConfigDict:
    """A baseline's view of a task: its fine-tuning config (data, task type, metric,
    max_train_examples) with the seed; no variant applies."""
    return task_config(suite.tasks[task], f'tasks.{task}', f'seed={seed}')


def check_names(suite: ml_collections.ConfigDict) -> None:
    """Every task and variant name is a plain folder name, so that no run's workdir
    (WORKDIR/TASK/VARIANT/seed_N) lands outside WORKDIR."""
    for section in ('tasks', 'variants'):
        for name in suite[section]:
            if not _NAME.fullmatch(name):
                key = f'--config.{section}.{name}'
                raise ConfigError(f'{key if key.isprintable() else repr(key)}: the name '
                                  'becomes a folder of the workdir; use letters, digits, '
                                  "'_', '-' and '.' (not first)")


def validate(suite: ml_collections.ConfigDict) -> None:
    """Names are folder names and every run's config resolves (keys exist, values parse),
    before anything trains."""
    check_names(suite)
    if not list(_runs(suite)) and not (_tasks(suite) and _baselines(suite) and suite.seeds):
        raise ConfigError('tasks, variants and seeds: each needs at least one entry')
    for kind in _baselines(suite):
        if kind not in baselines.KINDS:
            raise ConfigError(f'baselines: unknown {kind!r}; choose from {list(baselines.KINDS)}')
        if kind in suite.variants:
            raise ConfigError(f'baselines: {kind!r} is also a variant name')
    if 'tfidf' in _baselines(suite):
        try:
            baselines.require_sklearn()
        except ValueError as e:
            raise ConfigError(f'baselines: {e}') from None
    for task, metric in suite.get('headline_metrics', {}).items():
        if task not in suite.tasks:
            raise ConfigError(f'headline_metrics.{task}: no such task')
        if metric not in (*finetune_metrics.METRIC_DIRECTIONS, BINARY_F1):
            raise ConfigError(f'headline_metrics.{task}: unknown metric {metric!r}')
    for task in _tasks(suite) if _baselines(suite) else ():
        baseline_config(suite, task, 0)  # its keys and values parse
    for task, variant, seed in _runs(suite):
        try:
            finetune_train.validate(run_config(suite, task, variant, seed))
        except ConfigError as e:
            raise ConfigError(f'{task} / {variant} / seed {seed}: {e}') from None


def binary_f1(split: dict) -> dict[str, float]:
    """{'f1_binary': F1 of class 1} from a two-class split's confusion matrix (GLUE's F1
    for MRPC and QQP, sklearn's average='binary'; the trainer's `f1` is the macro F1);
    {} for other splits."""
    cm = np.asarray(split.get('confusion_matrix', []), np.float64)
    if cm.shape != (2, 2):
        return {}
    tp, fp, fn = cm[1, 1], cm[0, 1], cm[1, 0]
    return {BINARY_F1: float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0}


def _scores(results: dict, metrics: tuple[str, ...]) -> dict[str, float]:
    split = results.get('test') or results['validation']
    split = {**split, **binary_f1(split)}
    return {m: float(split[m]) for m in metrics if m in split}


def headline(suite: ml_collections.ConfigDict, task: str, cfg: ml_collections.ConfigDict
             ) -> str:
    """The task table's metric of a task: headline_metrics.TASK, else its `metric`."""
    return suite.get('headline_metrics', {}).get(task) or cfg.metric


def summarize(rows: list[dict], metrics: tuple[str, ...]) -> list[dict]:
    """Rows of (task, variant, seed, metric values) -> one row per (task, variant) with the
    mean, the sample standard deviation (0 for one seed) and the seed count per metric."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row['task'], row['variant']), []).append(row)
    table = []
    for (task, variant), members in groups.items():
        out = {'task': task, 'variant': variant, 'seeds': len(members)}
        for m in metrics:
            values = np.array([r[m] for r in members if m in r], np.float64)
            out[f'{m}_mean'] = float(values.mean()) if values.size else math.nan
            out[f'{m}_std'] = float(values.std(ddof=1)) if values.size > 1 else 0.0
        table.append(out)
    return table


def _cell(row: dict, m: str) -> str:
    mean, std = row[f'{m}_mean'], row[f'{m}_std']
    return '—' if math.isnan(mean) else f'{mean:.3f} ± {std:.3f}'  # — : not this task's


def write_tables(workdir: pathlib.Path, table: list[dict], metrics: tuple[str, ...]) -> None:
    """results.csv (numbers) and results.md (mean ± std, 3 decimals)."""
    with open(workdir / 'results.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = ['| task | variant | seeds | ' + ' | '.join(metrics) + ' |',
             '|---|---|---:|' + '---:|' * len(metrics)]
    for row in table:
        cells = [_cell(row, m) for m in metrics]
        lines.append(f"| {row['task']} | {row['variant']} | {row['seeds']} | "
                     + ' | '.join(cells) + ' |')
    (workdir / 'results.md').write_text('\n'.join(lines) + '\n')


def _write_all(root: pathlib.Path, suite, rows: list[dict], metrics: tuple[str, ...],
               metric_of: dict[str, str]) -> list[dict]:
    table = summarize(rows, metrics)
    write_tables(root, table, metrics)
    if suite.get('task_table', False):
        methods = _methods(suite)
        by_task = task_table.summarize(rows, _tasks(suite), methods,
                                       suite.get('low_label_suffix', ''))
        task_table.write(root, by_task, metric_of)
    return table


def run(suite: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Runs (or resumes) the whole suite, baselines first; returns the summary table."""
    validate(suite)
    root = local_dir(workdir, 'suite')
    root.mkdir(parents=True, exist_ok=True)
    metrics = tuple(suite.metrics)
    runs = [(t, k, int(s)) for t in _tasks(suite) for k in _baselines(suite)
            for s in suite.seeds] + list(_runs(suite))
    metric_of: dict[str, str] = {}
    rows = []
    for i, (task, variant, seed) in enumerate(runs, 1):
        run_dir = root / task / variant / f'seed_{seed}'
        print(f'[{i}/{len(runs)}] {task} / {variant} / seed {seed}: {run_dir}', flush=True)
        if variant in _baselines(suite):  # validate() keeps baseline and variant names apart
            cfg = baseline_config(suite, task, seed)
            try:
                results = baselines.run(variant, cfg, run_dir)
            except ValueError as e:  # bad data, or its wheel cannot be fetched: one line
                raise ConfigError(f'{task} / {variant} / seed {seed}: data: {e}') from None
        else:
            cfg = run_config(suite, task, variant, seed)
            results = finetune_train.run(cfg, str(run_dir))
        metric_of[task] = headline(suite, task, cfg)
        scores = _scores(results, (*metrics, metric_of[task]))
        if metric_of[task] not in scores:
            raise ConfigError(f'headline_metrics.{task}: {metric_of[task]!r} is not in '
                              f'{run_dir}/results.json (f1_binary: two classes only)')
        rows.append({'task': task, 'variant': variant, 'seed': seed,
                     **{m: scores[m] for m in metrics if m in scores},
                     'score': scores[metric_of[task]]})
        table = _write_all(root, suite, rows, metrics, metric_of)
    (root / 'runs.json').write_text(json.dumps(rows, indent=1) + '\n')
    print((root / 'results.md').read_text(), flush=True)
    if suite.get('task_table', False):
        print((root / 'results_tasks.md').read_text(), flush=True)
        task_table.chart(root, task_table.summarize(rows, _tasks(suite), _methods(suite),
                                                    suite.get('low_label_suffix', '')))
    return table
