"""End to end through `launch.py pretrain`, as a user runs it: learning, files, resume.

Runs are subprocesses so each can choose its device count, and so SIGTERM / SIGKILL hit
a real process. The model is tiny (1 layer, H32) to keep the suite fast on 2 cores.
"""

import json
import pathlib
import signal
import subprocess
import time

import numpy as np
import pytest

from launch import main as launch_main
from tests.helpers import REPO, env, launch, launch_command, tiny_args
from tests.helpers import read_metrics as metrics


def launch_and_signal(workdir, args, sig, ready) -> tuple[int, str]:
    """Starts a run, sends `sig` once `ready(workdir)` is true; returns (exit code, stderr)."""
    cmd = launch_command('pretrain', '--workdir', str(workdir), *args)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ready(pathlib.Path(workdir)) and proc.poll() is None:
        assert time.time() < deadline, 'run never reached the point to interrupt'
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def final_params(workdir) -> dict[str, np.ndarray]:
    """The latest checkpoint's params as numpy, read back with orbax."""
    from engine.checkpoint import read_params_numpy
    return read_params_numpy(str(pathlib.Path(workdir) / 'checkpoints'))


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, corpus):
    """200 steps with dropout, checkpoints every 50: the reference for resume tests."""
    workdir = tmp_path_factory.mktemp('reference')
    result = launch(workdir, resume_args(corpus))
    assert result.returncode == 0, result.stderr
    return workdir


def resume_args(corpus: str) -> list[str]:
    return tiny_args(corpus, 200, '--config.checkpoint_every_steps=50', dropout=0.1)


def has_logged(workdir: pathlib.Path) -> bool:
    path = workdir / 'metrics.jsonl'
    return path.exists() and path.stat().st_size > 0


@pytest.mark.slow
def test_tiny_run_learns_and_writes_its_workdir(tmp_path, corpus):
    # A relative --workdir, as users type it (orbax itself needs absolute paths).
    result = launch('run', tiny_args(corpus, 80, '--config.eval_every_steps=40'), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    tmp_path = tmp_path / 'run'
    records = [r for r in metrics(tmp_path) if 'loss' in r]
    assert [r['step'] for r in records] == list(range(2, 81, 2))
    for key in ('loss', 'mlm_accuracy', 'learning_rate', 'grad_norm', 'tokens_per_sec'):
        assert all(np.isfinite(r[key]) for r in records[1:]), key
    first, last = np.mean([r['loss'] for r in records[:3]]), np.mean(
        [r['loss'] for r in records[-3:]])
    assert last < first - 1.0, (first, last)
    # From chance (1/128) to well above it: 'the' and '.' alone are a quarter of the tokens.
    last_acc = np.mean([r['mlm_accuracy'] for r in records[-5:]])
    assert records[0]['mlm_accuracy'] < 0.05 and last_acc > 0.15, (records[0], last_acc)
    evals = [r for r in metrics(tmp_path) if 'eval_loss' in r]
    assert [r['step'] for r in evals] == [40, 80]
    assert evals[1]['eval_loss'] < evals[0]['eval_loss'] and evals[1]['eval_mlm_accuracy'] > 0.15
    assert (tmp_path / 'spm.model').is_file()
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['num_train_steps'] == 80 and config['model']['hidden_size'] == 32
    assert (tmp_path / 'checkpoints' / '80').is_dir()
    assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical(tmp_path, corpus, uninterrupted):
    args = resume_args(corpus)
    code, stderr = launch_and_signal(tmp_path, args, signal.SIGTERM, has_logged)
    assert code == 75, stderr  # EX_TEMPFAIL: saved, run again (engine.loop.REQUEUE_EXIT_CODE)
    assert 'SIGTERM: saved a checkpoint at step' in stderr
    stopped_at = max(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()
                     if p.name.isdigit())
    assert stopped_at < 200
    result = launch(tmp_path, args)
    assert result.returncode == 0, result.stderr
    assert f'resuming from step {stopped_at}' in result.stdout
    assert_same_params(final_params(tmp_path), final_params(uninterrupted))
    assert [r['step'] for r in metrics(tmp_path) if 'loss' in r] == list(range(2, 201, 2))


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path, corpus, uninterrupted):
    args = resume_args(corpus)
    code, _ = launch_and_signal(tmp_path, args, signal.SIGKILL,
                                lambda w: (w / 'checkpoints' / '50').is_dir())
    assert code == -signal.SIGKILL
    result = launch(tmp_path, args)
    assert result.returncode == 0, result.stderr
    assert 'resuming from step' in result.stdout
    assert_same_params(final_params(tmp_path), final_params(uninterrupted))


@pytest.mark.slow
def test_checkpoint_from_a_2x4_mesh_resumes_on_one_device(tmp_path, corpus, capsys):
    # The first half (in this process: 8 fake devices) also exercises bf16 compute and
    # whole-word masking end to end; the second runs in a 1-device subprocess.
    assert launch_main(['pretrain', '--workdir', str(tmp_path), *tiny_args(
        corpus, 4, "--config.mesh.shape=(2,4)", '--config.model.dtype=bfloat16',
        '--config.masking.whole_word=true')]) == 0
    assert "'data': 2, 'fsdp': 4" in capsys.readouterr().out
    # The masking is the run's (a resume keeps it); mesh, devices and dtype may change.
    result = launch(tmp_path, tiny_args(corpus, 8, '--config.masking.whole_word=true'),
                    devices=1)
    assert result.returncode == 0, result.stderr
    assert 'resuming from step 4' in result.stdout and "'data': 1, 'fsdp': 1" in result.stdout
    assert (tmp_path / 'checkpoints' / '8').is_dir()
    assert all(np.isfinite(v).all() for v in final_params(tmp_path).values())


def test_bad_config_is_one_line_with_no_traceback(tmp_path, corpus):
    workdir = tmp_path / 'never'
    result = launch(workdir, tiny_args(corpus, 4, '--config.model.num_layer=3'))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --config.model.num_layer: unknown config key "
        "(did you mean 'model.num_layers'?)")
    assert not workdir.exists()


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    result = launch(tmp_path, tiny_args(
        corpus, 20, '--config.optimizer.learning_rate=1e30', '--config.optimizer.warmup_steps=0',
        '--config.optimizer.max_grad_norm=0', '--config.checkpoint_every_steps=1'))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: loss became nan by step 2'), last
    assert 'last good checkpoint: step 1' in last
    saved = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
    assert saved == ['1']


@pytest.mark.slow
def test_mixture_of_two_sources(tmp_path, corpus):
    first, second = sorted(pathlib.Path(corpus).parent.glob('*.txt'))
    workdir = tmp_path / 'mix'
    args = tiny_args(corpus, 4, f'--config.data.sources.first={first}',
                     f'--config.data.sources.second={second}',
                     '--config.data.mixture=first:0.75,second:0.25', '--config.eval_every_steps=4')
    assert launch_main(['prepare', '--workdir', str(workdir), *args]) == 0
    prepared = sorted((workdir / 'data').iterdir())
    assert len(prepared) == 2  # each source prepared once, on its own
    assert launch_main(['pretrain', '--workdir', str(workdir), *args]) == 0
    assert sorted((workdir / 'data').iterdir()) == prepared  # found, not prepared again
    records = metrics(workdir)
    assert [r['step'] for r in records if 'loss' in r] == [2, 4]
    assert np.isfinite(records[-1]['eval_loss'])
