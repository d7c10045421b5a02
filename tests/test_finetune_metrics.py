"""Fine-tuning metrics against values worked out by hand (and sklearn/scipy if present)."""

import math
import warnings

import numpy as np
import pytest

from finetune import metrics

# 3 classes, 10 examples. Confusion matrix (rows true, columns predicted):
#   [[2, 1, 1],     true counts t = [4, 3, 3], predicted counts p = [3, 4, 3], tp = [2, 2, 2]
#    [1, 2, 0],     precision = tp/p = [2/3, 1/2, 2/3]     recall = tp/t = [1/2, 2/3, 2/3]
#    [0, 1, 2]]     f1 = 2PR/(P+R) = [4/7, 4/7, 2/3]
# macro precision = macro recall = 11/18, macro f1 = (4/7 + 4/7 + 2/3)/3 = 38/63
# MCC (Gorodkin): c = 6, s = 10, t.p = 33, p.p = t.t = 34
#   (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = 27 / 66 = 9/22
LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PREDICTIONS = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]


def test_three_class_by_hand():
    m = metrics.classification_metrics(np.array(LABELS), np.array(PREDICTIONS), 3)
    assert m['confusion_matrix'] == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]
    assert m['accuracy'] == pytest.approx(0.6)
    assert m['precision'] == pytest.approx(11 / 18)
    assert m['recall'] == pytest.approx(11 / 18)
    assert m['f1'] == pytest.approx(38 / 63)
    assert m['mcc'] == pytest.approx(9 / 22)
    # Scores instead of ids: the argmax is taken.
    scores = np.eye(3)[PREDICTIONS] * 2.0 - 1.0
    assert metrics.classification_metrics(LABELS, scores, 3) == m


def test_absent_class_is_skipped_and_silent_class_scores_zero():
    with_unused = metrics.classification_metrics(LABELS, PREDICTIONS, 5)
    assert with_unused['f1'] == pytest.approx(38 / 63)  # classes 3, 4: no labels, no predictions
    assert with_unused['precision'] == pytest.approx(11 / 18)
    assert with_unused['mcc'] == pytest.approx(9 / 22)
    assert len(with_unused['confusion_matrix']) == 5
    # Everything predicted as class 0: classes 1 and 2 have labels but no predictions.
    # precision [1/3, 0, 0], recall [1, 0, 0], f1 [1/2, 0, 0]; MCC undefined (one column).
    m = metrics.classification_metrics([0, 1, 2], [0, 0, 0], 3)
    assert m['precision'] == pytest.approx(1 / 9)
    assert m['recall'] == pytest.approx(1 / 3)
    assert m['f1'] == pytest.approx(1 / 6)
    assert m['mcc'] == 0.0 and m['accuracy'] == pytest.approx(1 / 3)


def test_perfect_and_binary_mcc():
    perfect = metrics.classification_metrics([0, 1, 1, 2], [0, 1, 1, 2], 3)
    assert perfect['accuracy'] == perfect['f1'] == perfect['mcc'] == 1.0
    # Binary: tp=2 tn=1 fp=1 fn=1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6.
    binary = metrics.classification_metrics([1, 1, 1, 0, 0], [1, 1, 0, 1, 0], 2)
    assert binary['mcc'] == pytest.approx(1 / 6)
    reversed_ = metrics.classification_metrics([0, 1, 0, 1], [1, 0, 1, 0], 2)
    assert reversed_['mcc'] == pytest.approx(-1.0)


def test_classification_errors():
    with pytest.raises(ValueError, match=r'class ids must be in \[0, 3\)'):
        metrics.classification_metrics([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match='differ in length'):
        metrics.classification_metrics([0, 1], [0], 3)
    with pytest.raises(ValueError, match='integer class ids'):
        metrics.classification_metrics([0.5], [0], 3)


def test_against_sklearn():
    skm = pytest.importorskip('sklearn.metrics')
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    p[y == 3] = 3  # make it better than chance
    m = metrics.classification_metrics(y, p, 4)
    assert m['accuracy'] == pytest.approx(skm.accuracy_score(y, p))
    for name, fn in (('precision', skm.precision_score), ('recall', skm.recall_score),
                     ('f1', skm.f1_score)):
        assert m[name] == pytest.approx(fn(y, p, average='macro', zero_division=0))
    assert m['mcc'] == pytest.approx(skm.matthews_corrcoef(y, p))
    assert m['confusion_matrix'] == skm.confusion_matrix(y, p, labels=range(4)).tolist()


def test_regression_by_hand():
    perfect = metrics.regression_metrics([1, 2, 3, 4], [2, 4, 6, 8])
    assert perfect['pearson'] == pytest.approx(1.0) and perfect['spearman'] == pytest.approx(1.0)
    assert perfect['mse'] == pytest.approx(7.5)  # (1 + 4 + 9 + 16) / 4
    anti = metrics.regression_metrics([1, 2, 3, 4], [40, 3, 2, 1])
    assert anti['spearman'] == pytest.approx(-1.0)  # monotone, not linear
    assert -1.0 < anti['pearson'] < -0.5
    # Ties: ranks of y are [1, 2.5, 2.5, 4], of p [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5]
    # and [-1.5, .5, -.5, 1.5] -> 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    ties = metrics.regression_metrics([1, 2, 2, 3], [1, 30, 20, 400])
    assert ties['spearman'] == pytest.approx(3 / math.sqrt(10))
    np.testing.assert_allclose(metrics.average_ranks(np.array([3., 1., 3., 2., 3.])),
                               [4, 1, 4, 2, 4])


def test_regression_constant_input_is_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        const = metrics.regression_metrics([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
        assert const['pearson'] == 0.0 and const['spearman'] == 0.0
        assert const['mse'] == pytest.approx(5 / 3)
        both = metrics.regression_metrics([2.0, 2.0], [2.0, 2.0])
        assert both == {'pearson': 0.0, 'spearman': 0.0, 'mse': 0.0}
        assert metrics.regression_metrics([], [])['mse'] == 0.0
    with pytest.raises(ValueError, match='NaN'):
        metrics.regression_metrics([1.0, float('nan')], [1.0, 2.0])


def test_regression_against_scipy():
    stats = pytest.importorskip('scipy.stats')
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 100).astype(float)  # many ties
    p = y + rng.normal(size=100)
    m = metrics.regression_metrics(y, p.reshape(-1, 1))  # (N, 1) model outputs are fine
    assert m['pearson'] == pytest.approx(stats.pearsonr(y, p)[0])
    assert m['spearman'] == pytest.approx(stats.spearmanr(y, p)[0])


def test_directions():
    assert metrics.METRIC_DIRECTIONS['mse'] == 'min' and metrics.METRIC_DIRECTIONS['mcc'] == 'max'
    assert metrics.is_better('accuracy', 0.8, 0.7) and not metrics.is_better('loss', 0.8, 0.7)
    assert metrics.is_better('mse', 1.0, None)
    with pytest.raises(ValueError, match='unknown'):
        metrics.is_better('bleu', 1.0, 0.0)
