"""One run per workdir (engine/lock.py): a live holder is named in one line, a dead one's
lock is taken over, and two runs started together do not both run."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from engine import lock as lock_lib
from engine.errors import ConfigError
from launch import main as launch_main
from tests.helpers import REPO, env, launch_command, read_metrics, tiny_args


def write_lock(workdir, **fields) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    record = {'host': socket.gethostname(), 'pid': os.getpid(), 'command': 'pretrain',
              'token': 'other', 'started': time.time(), 'heartbeat': time.time(), **fields}
    (workdir / lock_lib.LOCK_FILENAME).write_text(json.dumps(record))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_refused_in_one_line_and_released_locks_are_free(tmp_path):
    first = lock_lib.WorkdirLock(tmp_path, 'pretrain')
    first.acquire()
    with pytest.raises(ConfigError) as refused:
        lock_lib.WorkdirLock(tmp_path, 'finetune').acquire()
    message = str(refused.value)
    assert f'is in use by pretrain (pid {os.getpid()} on {socket.gethostname()}' in message
    assert '\n' not in message
    first.release()
    assert not (tmp_path / lock_lib.LOCK_FILENAME).exists()
    with lock_lib.WorkdirLock(tmp_path, 'finetune'):
        assert json.loads((tmp_path / '.lock').read_text())['command'] == 'finetune'


@pytest.mark.parametrize('fields, stale', [
    ({'pid': None}, True),  # this host, a process that has exited
    ({'host': 'elsewhere', 'heartbeat': time.time() - 10 * lock_lib.STALE_S}, True),
    ({'host': 'elsewhere'}, False),  # another host's fresh heartbeat: alive
    ({}, False),  # this host, a live pid (this process)
])
def test_stale_locks_are_taken_over_live_ones_are_not(tmp_path, fields, stale):
    if fields.get('pid', 0) is None:
        fields = {**fields, 'pid': dead_pid()}
    write_lock(tmp_path, **fields)
    candidate = lock_lib.WorkdirLock(tmp_path, 'pretrain')
    if stale:
        with candidate:
            assert json.loads((tmp_path / '.lock').read_text())['token'] == candidate.token
    else:
        with pytest.raises(ConfigError, match='is in use by pretrain'):
            candidate.acquire()


def test_a_torn_lock_file_is_taken_over(tmp_path):
    (tmp_path / '.lock').write_text('{"host": "x", "pi')
    with lock_lib.WorkdirLock(tmp_path, 'pretrain'):
        pass
    assert not (tmp_path / '.lock').exists()


@pytest.mark.slow
def test_a_second_run_on_a_live_workdir_stops_and_leaves_it_alone(tmp_path, corpus, capsys):
    workdir = tmp_path / 'run'
    args = tiny_args(corpus, 400, '--config.checkpoint_every_steps=1000')
    first = subprocess.Popen(launch_command('pretrain', '--workdir', str(workdir), *args),
                             cwd=REPO, env=env(1), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (workdir / 'metrics.jsonl').exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()
            time.sleep(0.05)
        assert launch_main(['pretrain', '--workdir', str(workdir), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f'error: --workdir: {workdir} is in use by pretrain (pid '
                              f'{first.pid} on ') and err.count('\n') == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    steps = [r['step'] for r in read_metrics(workdir) if 'loss' in r]
    assert steps == sorted(set(steps))  # one writer: no duplicated or reordered steps
    assert not (workdir / '.lock').exists()  # released on the way out


@pytest.mark.slow
def test_two_runs_started_together_on_a_fresh_workdir(tmp_path, corpus):
    workdir = tmp_path / 'run'
    cmd = launch_command('pretrain', '--workdir', str(workdir), *tiny_args(corpus, 4))
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env(1), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert 'is in use by pretrain' in refused and 'Traceback' not in refused
    assert [r['step'] for r in read_metrics(workdir) if 'loss' in r] == [2, 4]


def test_the_heartbeat_refreshes_the_lock_without_errors(tmp_path, monkeypatch):
    # The heartbeat replaces an existing lock file: several beats, no thread exception.
    monkeypatch.setattr(lock_lib, 'HEARTBEAT_S', 0.05)
    errors = []
    monkeypatch.setattr(threading, 'excepthook', lambda args: errors.append(args.exc_value))
    with lock_lib.WorkdirLock(tmp_path, 'pretrain') as lock:
        first = json.loads((tmp_path / '.lock').read_text())['heartbeat']
        time.sleep(0.4)
        record = json.loads((tmp_path / '.lock').read_text())
    assert errors == []
    assert record['heartbeat'] > first and record['token'] == lock.token
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary files left


# A pid is reused: after a container restart the pid in a lock may name another process, or
# the new run itself. The lock records the holder's start time and the machine's boot id.

needs_proc = pytest.mark.skipif(not os.path.exists('/proc/self/stat'), reason='no /proc here')


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot."""
    stat = open(f'/proc/{pid}/stat').read()
    return int(stat[stat.rindex(')') + 1:].split()[19])


def boot_id() -> str:
    return open('/proc/sys/kernel/random/boot_id').read().strip()


@pytest.fixture
def sleeper():
    """A live process of this host that is not a run."""
    proc = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    yield proc.pid
    proc.kill()
    proc.wait()


@needs_proc
@pytest.mark.parametrize('case', ['our own pid', 'another live pid', 'another boot'])
def test_a_reused_pid_is_taken_over_in_one_line(tmp_path, caplog, sleeper, case):
    pid = {'our own pid': os.getpid(), 'another live pid': sleeper,
           'another boot': os.getpid()}[case]
    fields = {'pid': pid, 'pid_start': start_time(pid) - 1000, 'boot_id': boot_id()}
    if case == 'another boot':  # the pid's start time matches: only the boot tells
        fields.update(pid_start=start_time(pid), boot_id='00000000-0000-0000-0000-000000000000')
    write_lock(tmp_path, **fields)
    caplog.set_level('INFO', logger='engine.lock')
    with lock_lib.WorkdirLock(tmp_path, 'pretrain') as candidate:
        record = json.loads((tmp_path / '.lock').read_text())
    assert record['token'] == candidate.token
    assert record['pid_start'] == start_time(os.getpid()) and record['boot_id'] == boot_id()
    reason = ('this machine has restarted since' if case == 'another boot'
              else f'pid {pid} is now another process')
    assert [r.getMessage() for r in caplog.records if r.name == 'engine.lock'] == [
        f'taking over the lock of pretrain (pid {pid} on {socket.gethostname()}): {reason}']


@needs_proc
def test_a_live_holder_with_its_start_time_is_still_refused(tmp_path, sleeper):
    write_lock(tmp_path, pid=sleeper, pid_start=start_time(sleeper), boot_id=boot_id())
    with pytest.raises(ConfigError, match=f'is in use by pretrain \\(pid {sleeper} on '):
        lock_lib.WorkdirLock(tmp_path, 'pretrain').acquire()
    write_lock(tmp_path, pid=sleeper)  # an older lock without them: judged by its pid
    with pytest.raises(ConfigError, match=f'is in use by pretrain \\(pid {sleeper} on '):
        lock_lib.WorkdirLock(tmp_path, 'pretrain').acquire()


@needs_proc
def test_a_lock_held_by_another_live_process_is_refused(tmp_path):
    holder = ("import sys, time; from engine.lock import WorkdirLock; "
              "lock = WorkdirLock(sys.argv[1], 'pretrain'); lock.acquire(); print('held', "
              "flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, '-c', holder, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == 'held\n'
        with pytest.raises(ConfigError, match=f'is in use by pretrain \\(pid {proc.pid} on '):
            lock_lib.WorkdirLock(tmp_path, 'finetune').acquire()
    finally:
        proc.kill()
        proc.wait()
    with lock_lib.WorkdirLock(tmp_path, 'finetune'):  # killed: its lock is taken over
        pass
