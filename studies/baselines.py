"""Non-neural baselines of a suite's tasks: `run(kind, cfg, workdir)` -> results.json.

Each baseline reads its task exactly as a fine-tuning run with the same config does
(finetune.data.load_task: the same split files, the same seeded max_train_examples subset),
so its rows in the suite's tables are comparable with the neural ones:

  majority  predicts the most frequent training label (the training mean for regression).
  tfidf     TF-IDF of word 1-2 grams (lowercased, sublinear tf, min_df 1) with logistic
            regression (classification) or ridge regression; the inverse regularization C
            (or ridge alpha) is the best of BASELINE_GRID on the validation split by the
            run's `metric`, then test is scored once. scikit-learn, an optional extra, is
            imported here only.

The seed changes the training subset (max_train_examples); on the full training set both
baselines are deterministic, so their standard deviation over seeds is 0. data.few_shot_k
and augmentation are not applied (the benchmark uses neither).
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
import numpy as np

from engine.rundir import RunDir
from finetune import data, metrics

KINDS = ('majority', 'tfidf')
BASELINE_GRID = (0.1, 1.0, 10.0)  # logistic regression C, or ridge alpha
SKLEARN_HINT = 'the tfidf baseline needs scikit-learn: pip install scikit-learn'


def require_sklearn() -> None:
    """A one-line ValueError when scikit-learn is missing (checked before a suite starts)."""
    try:
        import sklearn  # noqa: F401  (only whether it imports)
    except ImportError:
        raise ValueError(SKLEARN_HINT) from None


def _texts(examples: data.Examples) -> list[str]:
    if examples.text_b is None:
        return list(examples.text_a)
    return [f'{a} [SEP] {b}' for a, b in zip(examples.text_a, examples.text_b, strict=True)]


def _score(task: str, labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    if task == 'regression':
        return metrics.regression_metrics(labels, predictions)
    return metrics.classification_metrics(labels, predictions.astype(np.int64), num_classes)


def _majority(train: data.Examples, task: str):
    if task == 'regression':
        mean = float(np.mean(train.labels))
        return lambda ex: np.full(len(ex), mean, np.float64)
    counts = np.bincount(train.labels)
    top = int(np.argmax(counts))  # ties: the first label in label order
    return lambda ex: np.full(len(ex), top, np.int64)


def _tfidf(train: data.Examples, validation: data.Examples, task: str, metric: str,
           num_classes: int):
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression, Ridge
    except ImportError:
        raise ValueError(SKLEARN_HINT) from None
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
    x_train = vectorizer.fit_transform(_texts(train))
    x_val = vectorizer.transform(_texts(validation))
    best, best_value = None, None
    if task == 'classification' and len(np.unique(train.labels)) < 2:
        return _majority(train, task)  # one class in a tiny training subset: nothing to fit
    for strength in BASELINE_GRID:
        if task == 'regression':
            model = Ridge(alpha=strength)
        else:
            model = LogisticRegression(C=strength, max_iter=2000)
        model.fit(x_train, train.labels)
        value = _score(task, validation.labels, model.predict(x_val), num_classes)[metric]
        if metrics.is_better(metric, value, best_value):
            best, best_value = model, value
    return lambda ex: best.predict(vectorizer.transform(_texts(ex)))


def run(kind: str, cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Fits baseline `kind` on the task of fine-tuning config `cfg` and writes (or, when
    present, reads back) WORKDIR/results.json: {'baseline', 'metric', 'validation',
    'test'} with the same metrics as a fine-tuning run's."""
    if kind not in KINDS:
        raise ValueError(f'baselines: unknown {kind!r}; choose from {list(KINDS)}')
    run_dir = RunDir(workdir)
    done = run_dir.read_results()
    if done is not None:
        print(f'{run_dir.results_file} exists: this run is complete', flush=True)
        return done
    d = cfg.data
    task = data.load_task(d.train_file, d.validation_file, d.test_file,
                          text_column=d.text_column, text_b_column=d.text_b_column,
                          label_column=d.label_column, task=cfg.task,
                          validation_fraction=d.validation_fraction, seed=cfg.seed,
                          max_train_examples=d.max_train_examples)
    names = task['label_names']
    num_classes = len(names) if names else 0
    if kind == 'majority':
        predict = _majority(task['train'], cfg.task)
    else:
        predict = _tfidf(task['train'], task['validation'], cfg.task, cfg.metric, num_classes)
    results: dict = {'baseline': kind, 'metric': cfg.metric,
                     'train_examples': len(task['train'])}
    for split in ('validation', 'test'):
        if task[split] is not None:
            examples = task[split]
            results[split] = _score(cfg.task, examples.labels, predict(examples), num_classes)
    run_dir.write_json(run_dir.results_file, results, indent=2)
    shown = results.get('test') or results['validation']
    print(json.dumps({cfg.metric: shown[cfg.metric]}), flush=True)
    return results
