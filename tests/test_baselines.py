"""studies/baselines.py (majority, TF-IDF) and studies/task_table.py (the method x task table)."""

import json
import sys

import numpy as np
import pytest

from engine.config_cli import apply_overrides, load_config
from engine.errors import ConfigError
from finetune import data
from studies import baselines, suite, task_table
from tests.helpers import REPO, write_toy_task


def _cfg(train_file: str, *overrides: str):
    cfg = load_config(f'{REPO}/configs/finetune.py:custom')
    apply_overrides(cfg, [f'data.train_file={train_file}', *overrides])
    return cfg


@pytest.fixture(scope='module')
def toy(tmp_path_factory) -> str:
    return write_toy_task(tmp_path_factory.mktemp('toy'), 300, seed=3)


def test_majority_predicts_the_most_frequent_training_label(toy, tmp_path):
    results = baselines.run('majority', _cfg(toy), tmp_path)
    task = data.load_task(toy)  # what a fine-tuning run of the same config reads
    top = np.bincount(task['train'].labels).argmax()
    val = task['validation'].labels
    assert results['validation']['accuracy'] == pytest.approx(np.mean(val == top))
    assert 'test' not in results  # the toy task has no test split
    assert results['train_examples'] == len(task['train'])
    assert json.loads((tmp_path / 'results.json').read_text()) == results


def test_tfidf_learns_and_seeds_change_the_low_label_subset(toy, tmp_path):
    val = write_toy_task(tmp_path, 60, seed=4)  # a fixed validation file, as the bench has
    fixed = (f'data.validation_file={val}',)
    full = baselines.run('tfidf', _cfg(toy, *fixed), tmp_path / 'full')
    assert full['validation']['accuracy'] == 1.0  # the label is one word of the sentence
    again = baselines.run('tfidf', _cfg(toy, 'seed=1', *fixed), tmp_path / 'full1')
    assert again['validation'] == full['validation']  # all labels: the seed changes nothing
    low = [baselines.run('tfidf', _cfg(toy, f'seed={s}', 'data.max_train_examples=6', *fixed),
                         tmp_path / f'low{s}') for s in range(3)]
    assert {r['train_examples'] for r in low} == {6}
    assert len({r['validation']['f1'] for r in low}) > 1  # a different subset per seed


def test_regression_mean_predictor_and_ridge(tmp_path):
    rng = np.random.default_rng(0)
    words = rng.choice(['good', 'bad', 'fine'], size=200)
    score = {'good': 2.0, 'bad': -2.0, 'fine': 0.0}
    lines = ['text,label'] + [f'this is {w} stuff {i},{score[w] + rng.normal(0, 0.1):.3f}'
                              for i, w in enumerate(words)]
    (tmp_path / 'reg.csv').write_text('\n'.join(lines) + '\n')
    cfg = _cfg(str(tmp_path / 'reg.csv'), 'task=regression', 'metric=pearson')
    mean = baselines.run('majority', cfg, tmp_path / 'mean')['validation']
    assert mean['pearson'] == 0.0  # a constant prediction has no correlation
    task = data.load_task(str(tmp_path / 'reg.csv'), task='regression')
    expected = np.mean((task['validation'].labels - task['train'].labels.mean()) ** 2)
    assert mean['mse'] == pytest.approx(expected, rel=1e-5)
    ridge = baselines.run('tfidf', cfg, tmp_path / 'ridge')['validation']
    assert ridge['pearson'] > 0.95 and ridge['spearman'] > 0.8


def test_finished_baseline_is_read_back(toy, tmp_path, monkeypatch):
    first = baselines.run('majority', _cfg(toy), tmp_path)
    monkeypatch.setattr(data, 'load_task', lambda *a, **k: pytest.fail('refitted'))
    assert baselines.run('majority', _cfg(toy), tmp_path) == first


def test_missing_sklearn_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, 'sklearn', None)
    with pytest.raises(ValueError, match=r'^the tfidf baseline needs scikit-learn: pip install '
                                         r'scikit-learn$'):
        baselines.require_sklearn()
    cfg = load_config(f'{REPO}/configs/suite.py:bench')
    apply_overrides(cfg, ['baselines_only=True'])
    with pytest.raises(ConfigError, match='pip install scikit-learn'):
        suite.validate(cfg)


def test_suite_checks_baseline_names():
    cfg = load_config(f'{REPO}/configs/suite.py:bench')
    apply_overrides(cfg, ['baselines_only=True', 'baselines=("majority", "svm")'])
    with pytest.raises(ConfigError, match="unknown 'svm'"):
        suite.validate(cfg)
    cfg = load_config(f'{REPO}/configs/suite.py:bench')
    apply_overrides(cfg, ['variants.majority=freeze=encoder'])
    with pytest.raises(ConfigError, match="'majority' is also a variant"):
        suite.validate(cfg)


def test_task_table_averages_per_seed_then_over_seeds():
    rows = [{'task': t, 'variant': m, 'seed': s, 'score': v}
            for t, m, s, v in (('a', 'x', 0, 0.5), ('a', 'x', 1, 0.7), ('b', 'x', 0, 0.9),
                               ('b', 'x', 1, 0.7), ('a_1k', 'x', 0, 0.1), ('b_1k', 'x', 0, 0.3),
                               ('b_1k', 'x', 1, 0.5))]
    table = task_table.summarize(rows, ['a', 'b', 'a_1k', 'b_1k'], ['x', 'y'], '_1k')
    full, low = table
    assert (full['regime'], low['regime']) == ('all training labels', 'low-label (1k labels)')
    assert full['a'] == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1), 2))
    assert full['average'] == pytest.approx((0.7, 0.0, 2))  # seeds average 0.7 and 0.7
    assert low['average'] == pytest.approx((0.2, 0.0, 1))  # only seed 0 has both tasks
    assert low['a_1k'] == (0.1, 0.0, 1)


def test_task_table_files_and_chart_hint(tmp_path, monkeypatch, capsys):
    rows = [{'task': 'a', 'variant': m, 'seed': s, 'score': 0.5 + s / 10}
            for m in ('majority', 'finetune') for s in (0, 1)]
    table = task_table.summarize(rows, ['a'], ['majority', 'finetune'], '_1k')
    task_table.write(tmp_path, table, {'a': 'f1'})
    md = (tmp_path / 'results_tasks.md').read_text()
    assert '| method | a (f1) | average |' in md
    assert '| finetune | 0.550 ± 0.071 | **0.550 ± 0.071** |' in md
    csv_text = (tmp_path / 'results_tasks.csv').read_text().splitlines()
    assert csv_text[0] == 'regime,method,task,metric,mean,std,seeds' and len(csv_text) == 5
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    assert task_table.chart(tmp_path, table) is None
    assert task_table.MATPLOTLIB_HINT in capsys.readouterr().out
    assert not (tmp_path / 'results_tasks.png').exists()
