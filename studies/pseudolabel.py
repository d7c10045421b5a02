"""Self-training with pseudo-labels: `run(config, workdir)` for `launch.py pseudolabel`.

Every round is an ordinary fine-tuning run trained by `finetune.train.run` in
`WORKDIR/round_N/`. Round 0 trains on the labelled task. Before round N >= 1, round N-1's
best checkpoint predicts the unlabelled pool (`finetune.predict`), `select` keeps the
confident predictions, and `round_N/train.jsonl` = the labelled examples + those
pseudo-labels (also in `round_N/pseudo.jsonl` with their confidence). Round N then
fine-tunes from the same `init_from` with round 0's validation and test split, written to
`WORKDIR/validation.jsonl` / `test.jsonl` so every round scores on identical examples.

Resume: a round whose results.json exists is read back; one whose pseudo_stats.json exists
(written last) keeps its training file and resumes its checkpoint.
"""

import json
import pathlib
import shlex

import ml_collections
import numpy as np

from configs.pseudolabel import REST
from engine.config_cli import apply_overrides
from engine.errors import ConfigError
from engine.paths import local_dir, write_bytes_atomic
from engine.rundir import RESULTS_FILENAME
from finetune import augment, data, predict
from finetune import train as finetune_train
from finetune.task import load_config_task
from studies import suite
from text.tokenizer import MODEL_FILENAME

GOLD = 'gold_label'  # the true-label column of a 'rest' pool (diagnostics only)


def select(probs: np.ndarray, threshold: float, max_per_class: int = 0) -> np.ndarray:
    """Rows of `probs` (N, C) to pseudo-label, ascending: top class probability >=
    threshold; per predicted class at most `max_per_class` (0 = all), the most confident
    first (ties: the earlier row)."""
    probs = np.asarray(probs)
    confidence, predicted = probs.max(-1), probs.argmax(-1)
    keep = [np.zeros(0, np.int64)]
    for c in range(probs.shape[-1]):
        rows = np.flatnonzero((predicted == c) & (confidence >= threshold))
        rows = rows[np.argsort(-confidence[rows], kind='stable')]
        keep.append(rows[:max_per_class] if max_per_class else rows)
    return np.sort(np.concatenate(keep)).astype(np.int64)


def base_config(pl: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Round 0's fine-tuning config: the task with init_from applied first."""
    return suite.task_config(pl.task, 'task', f'init_from={pl.init_from}')


def _columns(cfg) -> tuple[str, str]:
    """(text, text_b) column names of the task's files (the demo's are fixed)."""
    if cfg.data.train_file == data.DEMO_TASK:
        return 'text', ''
    return cfg.data.text_column, cfg.data.text_b_column


def round_config(pl, r: int, root: pathlib.Path, paired: bool, has_test: bool):
    """Round r's config: round 0 is the task; later rounds train on round_r/train.jsonl
    with the shared validation/test files and the `retrain` overrides."""
    cfg = base_config(pl)
    if r == 0:
        return cfg
    d = cfg.data
    d.train_file = str(root / f'round_{r}' / 'train.jsonl')
    d.validation_file = str(root / 'validation.jsonl')
    d.test_file = str(root / 'test.jsonl') if has_test else ''
    d.text_column, d.text_b_column, d.label_column = 'text', 'text_b' if paired else '', 'label'
    d.max_train_examples, d.few_shot_k = 0, 0
    if cfg.init_from.lower() == 'none' and not cfg.tokenizer_model:
        cfg.tokenizer_model = str(root / 'round_0' / MODEL_FILENAME)  # one vocabulary
    try:
        apply_overrides(cfg, shlex.split(pl.retrain))
    except ValueError as e:
        raise ConfigError(f'retrain: {e}') from None
    return cfg


def _check(pl) -> None:
    if not 0.0 <= pl.threshold < 1.0:
        raise ConfigError(f'threshold: must be in [0, 1) (a top-class probability), got '
                          f'{pl.threshold}')
    if pl.rounds < 1:
        raise ConfigError(f'rounds: must be >= 1, got {pl.rounds}')
    if pl.max_pseudo_per_class < 0:
        raise ConfigError(f'max_pseudo_per_class: must be >= 0, got {pl.max_pseudo_per_class}')
    if not pl.unlabeled_file:
        raise ConfigError(f"unlabeled_file: empty; a CSV/TSV/JSONL file, or {REST!r}")


def validate(pl: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(round 0 config, its task, the pool) once config, task and pool all check out."""
    _check(pl)
    cfg = base_config(pl)
    if cfg.task != 'classification':
        raise ConfigError(f'task: pseudo-labelling needs a classification task, got '
                          f'{cfg.task!r}')
    try:
        cfg, _, task = finetune_train.validate(cfg)  # auto values resolved
    except ConfigError as e:
        raise ConfigError(f'task: {e}') from None
    pool = _rest_pool(cfg, task) if pl.unlabeled_file == REST else _read_pool(pl, cfg)
    round_config(pl, 1, pathlib.Path('.'), task['train'].text_b is not None, True)  # keys ok
    return cfg, task, pool


def _read_pool(pl, cfg) -> dict:
    path = pl.unlabeled_file
    if not pathlib.Path(path).is_file():
        raise ConfigError(f'unlabeled_file: no such file {path!r}')
    text, text_b = _columns(cfg)
    try:
        rows = data.read_examples(path, text_column=text, text_b_column=text_b,
                                  label_column=pl.gold_column)
    except ValueError as e:
        raise ConfigError(f'unlabeled_file: {e}') from None
    return {'text_a': [r['text_a'] for r in rows],
            'text_b': [r['text_b'] for r in rows] if text_b else None,
            'gold': [r['label'] for r in rows] if pl.gold_column else None}


def labelled_indices(n: int, max_train_examples: int, few_shot_k: int, seed: int,
                     labels: np.ndarray) -> np.ndarray:
    """Which of the n full training rows the task's labelled subset keeps: the same
    `subsample` and `few_shot` calls as fine-tuning, applied to row indices."""
    idx = np.arange(n)
    if max_train_examples:
        idx = np.asarray(data.subsample(list(idx), max_train_examples, seed), np.int64)
    if few_shot_k:
        rows = data.Examples(text_a=[str(i) for i in idx], text_b=None, labels=labels[idx])
        idx = np.asarray([int(i) for i in augment.few_shot(rows, few_shot_k, seed).text_a])
    return idx


def _rest_pool(cfg, task: dict) -> dict:
    """The full training split minus the labelled subset, with its true labels."""
    d = cfg.data
    if not (d.max_train_examples or d.few_shot_k):
        raise ConfigError(f'unlabeled_file={REST!r}: the task keeps all its training labels; '
                          'set data.max_train_examples or data.few_shot_k in task')
    full = load_config_task(cfg)['train']
    kept = labelled_indices(len(full), d.max_train_examples, d.few_shot_k, cfg.seed,
                            full.labels)
    labelled = task['train']
    if ([full.text_a[i] for i in kept] != labelled.text_a
            or not np.array_equal(full.labels[kept], labelled.labels)):
        raise RuntimeError('rest pool: the labelled subset could not be reproduced')
    rest = np.setdiff1d(np.arange(len(full)), kept)
    if not rest.size:
        raise ConfigError(f'unlabeled_file={REST!r}: no training examples are left over')
    return {'text_a': [full.text_a[i] for i in rest],
            'text_b': None if full.text_b is None else [full.text_b[i] for i in rest],
            'gold': [task['label_names'][full.labels[i]] for i in rest]}


def _write_jsonl(path: pathlib.Path, rows) -> None:
    """Written whole, never half a file."""
    write_bytes_atomic(path, ''.join(json.dumps(row) + '\n' for row in rows).encode('utf-8'))


def _rows(text_a, text_b, labels, **extra) -> list[dict]:
    rows = []
    for i, text in enumerate(text_a):
        row = {'text': text, **({'text_b': text_b[i]} if text_b is not None else {})}
        row.update({'label': labels[i]} if labels is not None else {})
        row.update({k: v[i] for k, v in extra.items() if v is not None})
        rows.append(row)
    return rows


def _split_rows(examples: data.Examples, names: list[str]) -> list[dict]:
    return _rows(examples.text_a, examples.text_b, [names[i] for i in examples.labels])


def _predict_pool(teacher: pathlib.Path, pool: dict) -> tuple[np.ndarray, list[str]]:
    """Class probabilities (N, C) of the pool by the teacher's best checkpoint."""
    cfg, model, params, names = predict.load_run(teacher)
    examples = data.Examples(text_a=pool['text_a'], text_b=pool['text_b'],
                             labels=np.zeros(len(pool['text_a']), np.int32))
    encoded = predict.encode_for_run(cfg, teacher, examples)
    return predict.predict(model, params, encoded, 'classification'), names


def _stats(pl, pool, probs, names, keep, labelled: int) -> dict:
    predicted = probs.argmax(-1)
    out = {'threshold': pl.threshold, 'max_pseudo_per_class': pl.max_pseudo_per_class,
           'pool': len(predicted), 'labelled': labelled, 'accepted': int(keep.size),
           'train_examples': labelled + int(keep.size),
           'accepted_per_class': {n: int(np.sum(predicted[keep] == c))
                                  for c, n in enumerate(names)}}
    if pool['gold'] is not None:
        right = np.array([names[p] == g for p, g in zip(predicted, pool['gold'], strict=True)])
        out['teacher_pool_accuracy'] = float(right.mean())
        out['precision'] = float(right[keep].mean()) if keep.size else None
        out['precision_per_class'] = {
            n: float(right[keep][predicted[keep] == c].mean())
            for c, n in enumerate(names) if np.any(predicted[keep] == c)}
    return out


def pseudo_round(pl, r: int, root: pathlib.Path, pool: dict, labelled: list[dict]) -> dict:
    """Writes round_r/pseudo.jsonl, train.jsonl and pseudo_stats.json from round r-1's
    predictions (unless pseudo_stats.json exists); returns the stats."""
    out = root / f'round_{r}'
    stats_path = out / 'pseudo_stats.json'
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    print(f'round {r}: labelling {len(pool["text_a"]):,} pool examples with round {r - 1}',
          flush=True)
    probs, names = _predict_pool(root / f'round_{r - 1}', pool)
    keep = select(probs, pl.threshold, pl.max_pseudo_per_class)
    labels = [names[c] for c in probs.argmax(-1)[keep]]
    pick = lambda v: None if v is None else [v[i] for i in keep]  # noqa: E731
    confidence = [round(float(p), 6) for p in probs.max(-1)[keep]]
    pseudo = _rows(pick(pool['text_a']), pick(pool['text_b']), labels, confidence=confidence,
                   **{GOLD: pick(pool['gold'])})
    _write_jsonl(out / 'pseudo.jsonl', pseudo)
    _write_jsonl(out / 'train.jsonl', labelled + [
        {k: v for k, v in row.items() if k in ('text', 'text_b', 'label')} for row in pseudo])
    stats = _stats(pl, pool, probs, names, keep, len(labelled))
    stats_path.write_text(json.dumps(stats, indent=1) + '\n')  # last: the round's marker
    return stats


def _fmt(value) -> str:
    return '-' if value is None else f'{value:.3f}'


def write_tables(root: pathlib.Path, rows: list[dict]) -> None:
    """results.json (everything) and results.md (one line a round + diagnostics)."""
    (root / RESULTS_FILENAME).write_text(json.dumps(rows, indent=1) + '\n')
    lines = ['| round | training examples | pseudo-labels accepted | pseudo-label precision '
             '| val acc | val F1 | test acc | test F1 |', '|---:' * 8 + '|']
    for row in rows:
        s, val, test = row.get('pseudo') or {}, row['validation'], row.get('test') or {}
        accepted = f"{s['accepted']:,} of {s['pool']:,}" if s else '-'
        lines.append(f"| {row['round']} | {row['train_examples']:,} | {accepted} | "
                     f"{_fmt(s.get('precision'))} | {_fmt(val['accuracy'])} | "
                     f"{_fmt(val['f1'])} | {_fmt(test.get('accuracy'))} | "
                     f"{_fmt(test.get('f1'))} |")
    for row in rows[1:]:
        s = row['pseudo']
        per = ', '.join(f'{n} {k:,}' + (f" ({s['precision_per_class'][n]:.3f})"
                                          if n in s.get('precision_per_class', {}) else '')
                        for n, k in s['accepted_per_class'].items())
        teacher = s.get('teacher_pool_accuracy')
        lines.append(f"\nRound {row['round']}: threshold {s['threshold']}, accepted per class "
                     f"(precision): {per}" + ('' if teacher is None else
                                              f'; teacher accuracy on the whole pool '
                                              f'{teacher:.3f}') + '.')
    (root / 'results.md').write_text('\n'.join(lines) + '\n')


def run(pl: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Runs (or resumes) round 0 and `rounds` pseudo-label rounds; returns their rows."""
    cfg, task, pool = validate(pl)
    root = local_dir(workdir, 'pseudolabel')
    root.mkdir(parents=True, exist_ok=True)
    names, paired = task['label_names'], task['train'].text_b is not None
    has_test = task['test'] is not None
    _write_jsonl(root / 'validation.jsonl', _split_rows(task['validation'], names))
    if has_test:
        _write_jsonl(root / 'test.jsonl', _split_rows(task['test'], names))
    if pl.unlabeled_file == REST:
        _write_jsonl(root / 'pool.jsonl', _rows(pool['text_a'], pool['text_b'], None,
                                                **{GOLD: pool['gold']}))
    labelled = _split_rows(task['train'], names)
    rows = []
    for r in range(pl.rounds + 1):
        stats = pseudo_round(pl, r, root, pool, labelled) if r else None
        print(f'[round {r}/{pl.rounds}] {root / f"round_{r}"}', flush=True)
        results = finetune_train.run(round_config(pl, r, root, paired, has_test),
                                     str(root / f'round_{r}'))
        rows.append({'round': r, 'train_examples': len(labelled) + (stats or {}).get(
            'accepted', 0), 'pseudo': stats, 'validation': results['validation'],
            'test': results.get('test')})
        write_tables(root, rows)
    print((root / 'results.md').read_text(), flush=True)
    return rows
