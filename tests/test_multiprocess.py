"""Two JAX processes on localhost (CPU collectives over gloo, 4 fake devices each) train
exactly as one process with 8 devices, and resume each other's checkpoints.

Each run goes through `launch.py pretrain --coordinator ... --num-processes 2
--process-id I`, as on a cluster: process 0 trains the tokenizer and builds the data while
process 1 waits, each process feeds only its own rows of every batch, only process 0
writes metrics, and both write their checkpoint shards - into a gs:// bucket (a local
GCS server, tests/fake_gcs.py) for the first two-process run, as pods do.
"""

import json
import shutil
import socket
import subprocess

import numpy as np
import pytest

from launch import main as launch_main
from tests.fake_gcs import download, fake_gcs
from tests.helpers import REPO, env, launch_command, read_metrics, tiny_args

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch_two(workdir, args) -> list[subprocess.CompletedProcess]:
    """The same command as two processes with 4 CPU devices each; waits for both."""
    coordinator = f'127.0.0.1:{free_port()}'
    procs = [subprocess.Popen(
        launch_command('pretrain', '--workdir', str(workdir), *args, '--coordinator',
                       coordinator, '--num-processes', '2', '--process-id', str(i)),
        cwd=REPO, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def run_args(corpus: str) -> list[str]:
    return tiny_args(corpus, STEPS, '--config.checkpoint_every_steps=3',
                     '--config.log_every_steps=1', '--config.mesh.shape=(4,2)')


def losses(workdir) -> list[float]:
    return [r['loss'] for r in read_metrics(workdir) if 'loss' in r]


def params(workdir) -> dict[str, np.ndarray]:
    from engine.checkpoint import read_params_numpy
    return read_params_numpy(f'{workdir}/checkpoints')


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=key)


def rewind(source, target, step: int = 3):
    """A copy of `source` whose latest checkpoint is `step` (as if stopped there)."""
    shutil.copytree(source, target)
    for path in (target / 'checkpoints').iterdir():
        if path.name.isdigit() and int(path.name) > step:
            shutil.rmtree(path)
    return target


@pytest.fixture(scope='module')
def single(tmp_path_factory, corpus):
    """The one-process reference, run in this process (which has 8 fake CPU devices)."""
    workdir = tmp_path_factory.mktemp('single')
    assert launch_main(['pretrain', '--workdir', str(workdir), *run_args(corpus)]) == 0
    return workdir


@pytest.mark.slow
def test_two_processes_match_one_and_resume_both_ways(tmp_path, corpus, single, capsys):
    prepared = tmp_path / 'prepared'  # a data_dir both processes see: they share the work
    with fake_gcs() as bucket:
        results = launch_two(f'{bucket}/two', [*run_args(corpus),
                                               f'--config.data.data_dir={prepared}'])
        assert [r.returncode for r in results] == [0, 0], results[0].stderr + results[1].stderr
        two = download(f'{bucket}/two', tmp_path / 'two')
    assert not (REPO / 'gs:').exists()  # no process mistook the URL for a local path
    assert 'fresh start' in results[0].stdout and 'step 6:' in results[0].stdout
    assert 'fresh start' not in results[1].stdout and 'step ' not in results[1].stdout
    assert len(losses(two)) == STEPS
    summaries = [json.loads(p.read_text()) for p in prepared.glob('*/unit-*.json')]
    # The two small files (24 KB each) pack as one unit, prepared once by one process.
    assert len(summaries) == 1 and summaries[0]['process'] in (0, 1)
    np.testing.assert_allclose(losses(two), losses(single), rtol=1e-5)
    assert_close(params(two), params(single))

    # The two-process checkpoint at step 3, resumed by the same two processes ...
    again = rewind(two, tmp_path / 'again')
    results = launch_two(again, run_args(corpus))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr + results[1].stderr
    assert 'resuming from step 3' in results[0].stdout
    assert_close(params(again), params(single))
    np.testing.assert_allclose(losses(again), losses(single), rtol=1e-5)

    # ... and by one process with 8 devices (this one).
    alone = rewind(two, tmp_path / 'alone')
    capsys.readouterr()
    assert launch_main(['pretrain', '--workdir', str(alone), *run_args(corpus)]) == 0
    assert 'resuming from step 3' in capsys.readouterr().out
    assert_close(params(alone), params(single))


def test_a_failure_in_process_0_data_preparation_stops_process_1(tmp_path, corpus):
    # A corrupt tokenizer file: process 0 fails to load it while process 1 waits.
    bad = tmp_path / 'bad.model'
    bad.write_text('not a sentencepiece model')
    args = run_args(corpus) + [f'--config.data.tokenizer_model={bad}']
    first, second = launch_two(tmp_path / 'fails', args)
    assert first.returncode == 2 and 'cannot load a sentencepiece model' in first.stderr
    assert second.returncode == 1, second.stderr[-2000:]
    assert "error: process 0 failed in 'data'" in second.stderr
