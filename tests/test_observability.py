"""Observability extras: Weights & Biases logging (`wandb.project`) and the profiler window
(`profile_steps`)."""

import sys
import types

import pytest

from engine.errors import ConfigError
from engine.loop import parse_profile_steps
from engine.metrics_writer import MetricWriter, require_wandb
from launch import main as launch_main
from tests.helpers import tiny_args


def _no_wandb(monkeypatch):
    """`import wandb` fails, whether or not it is installed here."""
    monkeypatch.setitem(sys.modules, 'wandb', None)


def _fake_wandb(monkeypatch) -> types.SimpleNamespace:
    """A `wandb` module that records its calls in the returned namespace."""
    calls = types.SimpleNamespace(init=[], log=[], finish=0)

    class Run:
        def log(self, data, step=None):
            calls.log.append((step, data))

        def finish(self):
            calls.finish += 1

    def init(**kwargs):
        calls.init.append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, 'wandb', types.SimpleNamespace(init=init))
    return calls


def test_without_wandb_a_set_project_is_a_one_line_error_before_training(
        monkeypatch, tmp_path, corpus, capsys):
    _no_wandb(monkeypatch)
    assert require_wandb('') is None  # off: nothing imported
    with pytest.raises(ConfigError, match=r'needs the optional extra \[wandb\]') as error:
        require_wandb('my-project')
    assert '\n' not in str(error.value)
    assert launch_main(['pretrain', '--workdir', str(tmp_path / 'run'), *tiny_args(
        corpus, 2, '--config.wandb.project=my-project')]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[wandb]'" in err and 'Traceback' not in err
    assert not (tmp_path / 'run' / 'config.json').exists()  # stopped before any work


def test_records_go_to_wandb_and_a_resumed_writer_continues_the_same_run(
        monkeypatch, tmp_path):
    calls = _fake_wandb(monkeypatch)
    settings = {'project': 'proj', 'entity': 'team', 'name': ''}
    (tmp_path / 'run').mkdir()
    writer = MetricWriter(str(tmp_path / 'run'), wandb=settings, run_config={'seed': 0})
    writer.write(2, {'loss': 1.5, 'eval_loss': 2.0, 'skipped_batches': [1, 2]})
    writer.write(4, {'loss': 1.25})
    writer.close()
    first = calls.init[0]
    assert (first['project'], first['entity'], first['name']) == ('proj', 'team', 'run')
    assert first['config'] == {'seed': 0} and first['resume'] == 'allow'
    assert first['dir'] == str(tmp_path / 'run')
    assert (tmp_path / 'run' / 'wandb_id.txt').read_text().strip() == first['id']
    assert calls.log == [(2, {'train/loss': 1.5, 'eval/loss': 2.0}),
                         (4, {'train/loss': 1.25})]
    assert calls.finish == 1

    resumed = MetricWriter(str(tmp_path / 'run'), resume_step=4,
                           wandb={**settings, 'name': 'named'})
    resumed.close()
    assert calls.init[1]['id'] == first['id'] and calls.init[1]['name'] == 'named'
    assert calls.finish == 2


def test_no_project_means_no_wandb(monkeypatch, tmp_path):
    _no_wandb(monkeypatch)  # would raise if imported
    writer = MetricWriter(str(tmp_path), wandb={'project': '', 'entity': '', 'name': ''})
    writer.write(1, {'loss': 1.0})
    writer.close()
    assert not (tmp_path / 'wandb_id.txt').exists()


@pytest.mark.parametrize('text', ['10', '5,2', '0,3', 'a,b', '1,2,3'])
def test_a_bad_profile_window_is_a_one_line_error(text):
    with pytest.raises(ConfigError, match='profile_steps') as error:
        parse_profile_steps(text)
    assert '\n' not in str(error.value)


def test_profile_windows():
    assert parse_profile_steps('') is None
    assert parse_profile_steps('10,15') == (10, 15)
    assert parse_profile_steps(' 3, 3 ') == (3, 3)


@pytest.mark.slow
def test_a_profile_window_writes_a_trace_under_the_workdir(tmp_path, corpus, capsys):
    workdir = tmp_path / 'run'
    assert launch_main(['pretrain', '--workdir', str(workdir), *tiny_args(
        corpus, 4, "--config.profile_steps=2,3")]) == 0
    traces = list((workdir / 'tensorboard' / 'profile').rglob('*.xplane.pb'))
    assert len(traces) == 1, list(workdir.rglob('*'))
    assert 'profile: trace written under' in capsys.readouterr().out
