"""Evaluation metrics on the host, in numpy: classification and regression.

Conventions follow scikit-learn where it has one: macro averages skip a class that has
neither labels nor predictions; a class's undefined precision or recall counts as 0;
an undefined correlation (constant input) is 0.0. No numpy warnings are raised.
"""

from __future__ import annotations

import numpy as np

from finetune import retrieval_metrics

# Which way is better, for early stopping and choosing the best checkpoint.
METRIC_DIRECTIONS = {
    'accuracy': 'max', 'precision': 'max', 'recall': 'max', 'f1': 'max', 'mcc': 'max',
    'pearson': 'max', 'spearman': 'max', 'mse': 'min', 'loss': 'min',
    **retrieval_metrics.METRIC_DIRECTIONS,  # task=embedding
    'exact_match': 'max',  # extractive QA (finetune/span_metrics.py)
}


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` beats `best` (None: nothing yet) for `metric`."""
    if metric not in METRIC_DIRECTIONS:
        raise ValueError(f'metric: unknown {metric!r}; known: {sorted(METRIC_DIRECTIONS)}')
    if best is None:
        return True
    return value > best if METRIC_DIRECTIONS[metric] == 'max' else value < best


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (sklearn's zero_division=0), without warnings."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _class_ids(name: str, values, num_classes: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f'{name}: expected a 1-D array of class ids, got shape {arr.shape}')
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f'{name}: expected integer class ids, got {arr.dtype}')
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f'{name}: class ids must be in [0, {num_classes}), '
                         f'got {arr.min()}..{arr.max()}')
    return arr.astype(np.int64)


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """int64 (num_classes, num_classes): [true class, predicted class] counts."""
    if num_classes < 1:
        raise ValueError(f'num_classes: must be positive, got {num_classes}')
    y = _class_ids('labels', labels, num_classes)
    p = _class_ids('predictions', predictions, num_classes)
    if len(y) != len(p):
        raise ValueError(f'labels ({len(y)}) and predictions ({len(p)}) differ in length')
    counts = np.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _mcc(cm: np.ndarray) -> float:
    """Gorodkin's multiclass Matthews correlation (R_K); 0 when undefined."""
    cm = cm.astype(np.float64)
    s, c = cm.sum(), np.trace(cm)
    t, p = cm.sum(axis=1), cm.sum(axis=0)  # true and predicted counts per class
    den = (s * s - p @ p) * (s * s - t @ t)
    return float((c * s - t @ p) / np.sqrt(den)) if den > 0 else 0.0


def classification_metrics(labels, predictions, num_classes: int) -> dict:
    """accuracy; macro precision, recall and f1; mcc; confusion_matrix (rows: true class).

    predictions: class ids, or scores of shape (N, num_classes) (argmax is taken).
    """
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    cm = confusion_matrix(labels, predictions, num_classes)
    tp = np.diag(cm)
    true, pred = cm.sum(axis=1), cm.sum(axis=0)
    precision, recall = _ratio(tp, pred), _ratio(tp, true)
    f1 = _ratio(2 * precision * recall, precision + recall)
    seen = (true + pred) > 0  # a class absent from both does not dilute the averages

    def macro(values: np.ndarray) -> float:
        return float(values[seen].mean()) if seen.any() else 0.0

    return {
        'accuracy': float(_ratio(tp.sum(), cm.sum())),
        'precision': macro(precision), 'recall': macro(recall), 'f1': macro(f1),
        'mcc': _mcc(cm), 'confusion_matrix': cm.tolist(),
    }


def _floats(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(arr).all():
        raise ValueError(f'{name}: contains NaN or infinite values')
    return arr


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    den = np.sqrt((dx @ dx) * (dy @ dy))
    # Clip: rounding can take a perfect correlation a hair past 1.
    return float(np.clip((dx @ dy) / den, -1.0, 1.0)) if den > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x; tied values share the mean of their ranks."""
    order = np.argsort(x, kind='stable')
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def regression_metrics(labels, predictions) -> dict:
    """pearson, spearman (ties get average ranks) and mse; undefined correlations are 0.0."""
    y, p = _floats('labels', labels), _floats('predictions', predictions)
    if len(y) != len(p):
        raise ValueError(f'labels ({len(y)}) and predictions ({len(p)}) differ in length')
    if len(y) == 0:
        return {'pearson': 0.0, 'spearman': 0.0, 'mse': 0.0}
    return {
        'pearson': _pearson(y, p),
        'spearman': _pearson(average_ranks(y), average_ranks(p)),
        'mse': float(np.mean((p - y) ** 2)),
    }
