"""A gs:// workdir whose storage endpoint cannot be reached: one line and exit code 2 within
seconds (not a minute of retries and a long traceback), and no local folder named 'gs:'."""

import socket
import time

import gcsfs
import pytest
from etils.epath import backend

import launch
from engine.errors import ConfigError
from engine.paths import check_reachable
from tests.helpers import REPO, tiny_args, write_toy_task


@pytest.fixture
def no_server(monkeypatch):
    """Points gcsfs (and tensorstore) at a local port where nothing listens."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    url = f'http://127.0.0.1:{port}'
    monkeypatch.setenv('STORAGE_EMULATOR_HOST', url)
    monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', url)
    gcsfs.GCSFileSystem.clear_instance_cache()  # a cached client would keep its endpoint
    type(backend.fsspec_backend)._get_filesystem.cache_clear()
    yield port
    gcsfs.GCSFileSystem.clear_instance_cache()
    type(backend.fsspec_backend)._get_filesystem.cache_clear()


def test_check_reachable_names_the_bucket_and_the_reason(no_server):
    with pytest.raises(ConfigError, match=r'^--workdir: cannot reach gs://bucket \(127\.0\.0\.1:'
                                          rf'{no_server}: .+\); check the network'):
        check_reachable('gs://bucket/some/run')
    check_reachable('runs/local')  # a local path is not probed


@pytest.mark.parametrize('command', ['pretrain', 'prepare', 'finetune'])
def test_an_unreachable_bucket_is_one_line_within_seconds(command, no_server, corpus, tmp_path,
                                                          monkeypatch, capsys):
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    if command == 'finetune':
        task = write_toy_task(tmp_path)
        args = ['--config', f'{REPO}/configs/finetune.py:custom',
                '--config.init_from=none', f'--config.data.train_file={task}',
                '--config.num_epochs=1', '--config.batch_size=16', '--config.seq_len=16']
    else:
        args = tiny_args(corpus, 2)
    started = time.monotonic()
    assert launch.main([command, '--workdir', 'gs://bucket/run', *args]) == 2
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert err.startswith('error: --workdir: cannot reach gs://bucket (') and err.count('\n') == 1
    assert list(cwd.iterdir()) == []  # no './gs:' folder, nothing else either
