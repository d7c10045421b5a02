"""Hyper-parameter search (`launch.py search`): space specs, trials, best config, resume."""

import csv
import json

import pytest

import launch
from engine.config_cli import apply_overrides, load_config
from engine.errors import ConfigError
from studies import search, search_space
from studies.search_space import Param, parse_spec
from tests.helpers import REPO, write_toy_task


@pytest.mark.parametrize('spec, expected', [
    ('loguniform(1e-5, 1e-3)', Param('k', 'loguniform', (1e-5, 1e-3))),
    (' uniform( 0 , 0.2 ) ', Param('k', 'uniform', (0.0, 0.2))),
    ('int(1, 5)', Param('k', 'int', (1, 5))),
    ('choice(16, 32)', Param('k', 'choice', (16, 32))),
    ("choice('none', \"layers:1\", 'a, b', -1.5e-3, True)",
     Param('k', 'choice', ('none', 'layers:1', 'a, b', -1.5e-3, True))),
])
def test_parse_spec(spec, expected):
    assert parse_spec('k', spec) == expected


@pytest.mark.parametrize('spec, message', [
    ('normal(0, 1)', 'expected one of loguniform'),
    ('uniform(0, 1', 'expected one of'),
    ('uniform(1)', 'needs two numbers'),
    ("uniform('a', 1)", 'needs two numbers'),
    ('uniform(0.2, 0.1)', 'low must be below high'),
    ('loguniform(0, 1e-3)', 'low > 0'),
    ('int(1, 2.5)', 'integer bounds'),
    ('choice()', 'one or more distinct'),
    ('choice(16, 16)', 'one or more distinct'),
    ('choice(none, encoder)', "'none' is not a finite number, True/False or a quoted"),
    ('choice(1, inf)', "'inf' is not a finite number"),
    ('__import__("os")', 'expected one of'),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message.replace('(', r'\(')) as e:
        parse_spec('k', spec)
    assert str(e.value).startswith('space.k: ')


def _search_config(*overrides: str):
    cfg = load_config(f'{REPO}/configs/search.py:demo')
    apply_overrides(cfg, ['init_from=/pre', *overrides])
    return cfg


def test_space_keys_and_types_are_checked_against_the_finetune_config():
    cfg = _search_config()
    params = search_space.parse_space(cfg.space, search.base_config(cfg))
    assert {p.key for p in params} == {'learning_rate', 'batch_size', 'warmup_fraction',
                                       'weight_decay', 'model.dropout_rate', 'freeze'}
    for key, spec, message in (('learning_rat', 'uniform(0, 1)', 'not a key of the fine-tuning'),
                               ('batch_size', 'uniform(8, 64)', 'does not fit the int value'),
                               ('freeze', 'choice(1, 2)', 'does not fit the str value'),
                               ('model.num_layerz', 'int(1, 2)', 'not a key')):
        bad = _search_config(f'space.{key}={spec}')
        with pytest.raises(ConfigError, match=message):
            search_space.parse_space(bad.space, search.base_config(bad))
    # Entries set to '' are dropped; an int choice for a float key is stored as a float.
    cfg = _search_config('space.learning_rate=', 'space.weight_decay=choice(0, 1)')
    assert 'learning_rate' not in {p.key for p in search_space.parse_space(
        cfg.space, search.base_config(cfg))}
    trial = search.trial_config(cfg, {'weight_decay': 0, 'freeze': 'layers:1',
                                      'model.dropout_rate': 0.05})
    assert (trial.weight_decay, trial.freeze, trial.model.dropout_rate) == (0.0, 'layers:1', 0.05)
    assert isinstance(trial.weight_decay, float)
    assert (trial.init_from, trial.data.max_train_examples, trial.num_epochs) == ('/pre', 1000, 3)


def _task_file(root) -> str:
    return write_toy_task(root, 200, seed=5)


def _rows(workdir) -> list[dict]:
    return list(csv.DictReader(open(workdir / 'trials.csv')))


def _f1(run_dir) -> float:
    return json.loads((run_dir / 'results.json').read_text())['validation']['f1']


@pytest.mark.slow
def test_search_end_to_end_best_config_resume_and_crash(tmp_path, pretrained_run, capsys,
                                                         monkeypatch):
    import optuna
    pre, work = pretrained_run, tmp_path / 'search'
    base = (f'custom data.train_file={_task_file(tmp_path)} num_epochs=1 seq_len=16 '
            'model.dropout_rate=0 model.attention_dropout_rate=0 log_every_steps=10 '
            'eval_every_steps=4')
    argv = ['search', '--config', f'{REPO}/configs/search.py:demo', '--workdir', str(work),
            f'--config.init_from={pre}', f'--config.base={base}', '--config.sampler=random',
            '--config.pruner=none', '--config.space.learning_rate=loguniform(1e-3, 1e-2)',
            '--config.space.warmup_fraction=', '--config.space.weight_decay=',
            '--config.space.model.dropout_rate=', "--config.space.freeze=choice('none', "
            "'encoder')", '--config.num_trials=3']
    assert launch.main([*argv, '--config.space.batch_size=choice(16, 3.5)']) == 2
    assert 'space.batch_size: choice(16, 3.5) does not fit' in capsys.readouterr().err
    assert launch.main(argv) == 0
    assert 'trial | state | f1' in capsys.readouterr().out  # the summary table
    study = optuna.load_study(study_name='search', storage=f'sqlite:///{work / "study.db"}')
    assert [t.state.name for t in study.trials] == ['COMPLETE'] * 3
    rows = _rows(work)
    assert [(r['number'], r['state']) for r in rows] == [(str(i), 'COMPLETE') for i in range(3)]
    for row in rows:  # each value is its trial's validation f1 (best checkpoint)
        assert float(row['value']) == _f1(work / f"trial_{row['number']}")
    best = rows[study.best_trial.number]
    config = json.loads((work / 'best_config.json').read_text())
    assert (config['learning_rate'], config['batch_size'], config['freeze']) == (
        float(best['learning_rate']), int(best['batch_size']), best['freeze'])
    # The best config re-runs as is, to the same validation metric (same seed).
    assert launch.main(['finetune', '--config', str(work / 'best_config.json'),
                        '--workdir', str(tmp_path / 'best')]) == 0
    assert _f1(tmp_path / 'best') == float(best['value'])

    argv[-1] = '--config.num_trials=4'  # continuing: exactly one more trial
    assert launch.main(argv) == 0
    assert [r['state'] for r in _rows(work)] == ['COMPLETE'] * 4 and _rows(work)[:3] == rows

    # A crash leaves a trial RUNNING: it is marked FAIL and its parameters run again, in its
    # workdir. That retry is pruned (a stand-in pruner): the report hook stops the run
    # after its first validation evaluation, and the workdir is left as it stopped.
    study.enqueue_trial({'learning_rate': 2e-3, 'batch_size': 16, 'freeze': 'encoder'})
    crashed = study.ask()
    crashed.suggest_float('learning_rate', 1e-3, 1e-2, log=True)  # as the objective does
    crashed.suggest_categorical('batch_size', [16, 32])
    crashed.suggest_categorical('freeze', ['none', 'encoder'])
    assert crashed.number == 4

    class AlwaysPrune(optuna.pruners.BasePruner):  # stands in for the median pruner
        def __init__(self, **kwargs):
            pass

        def prune(self, study, trial) -> bool:
            return True

    monkeypatch.setattr(optuna.pruners, 'MedianPruner', AlwaysPrune)
    argv[-1] = '--config.num_trials=5'
    argv[argv.index('--config.pruner=none')] = '--config.pruner=median'
    capsys.readouterr()
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert 'trial 4 was interrupted' in out and 'trial 5: pruned (f1=' in out
    after = _rows(work)
    assert [r['state'] for r in after] == ['COMPLETE'] * 4 + ['FAIL', 'PRUNED']
    assert (after[5]['learning_rate'], after[5]['batch_size'], after[5]['freeze']) == (
        '0.002', '16', 'encoder')
    steps = [json.loads(line)['step'] for line in open(work / 'trial_4' / 'metrics.jsonl')
             if 'eval_f1' in line]
    assert steps == [4] and not (work / 'trial_4' / 'results.json').exists()
    assert not (work / 'trial_5').exists()
    assert json.loads((work / 'best_config.json').read_text()) == config

    # A different space is a different search: refused, nothing run.
    assert launch.main([*argv, '--config.space.batch_size=choice(16)']) == 2
    assert 'holds a search with another base' in capsys.readouterr().err
