"""One run per workdir: WORKDIR/.lock names the holder (host, pid) while a run lives.

A second `pretrain`, `prepare` or `finetune` on a live workdir stops with one line naming
the holder instead of resuming from the first run's checkpoints and interleaving its
logs. A lock left by a dead process never blocks a resume: on the same host the pid is
checked, with the process's start time and the machine's boot id, since a pid is reused
(after a container restart it may belong to another process, or to the new run itself);
a lock written without them (an older version) is judged by its pid alone. From another
host (a shared or gs:// workdir) the lock is stale once its heartbeat, refreshed every
HEARTBEAT_S seconds by the holder, is older than STALE_S. Taking over a lock says why in
one line.
Only process 0 of a multi-process run takes the lock (the others are the same run).

Taking the lock is atomic on a local file system (O_CREAT | O_EXCL). On gs:// the object
is written, then read back after a moment: of two runs started in the same second, the
one whose write did not survive stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from engine import distributed
from engine.errors import ConfigError
from engine.paths import absolute_path, is_remote, write_bytes_atomic
from engine.rundir import LOCK_FILENAME

HEARTBEAT_S = 30.0
STALE_S = 180.0
_SETTLE_S = 1.0  # gs://: wait before reading the lock back

log = logging.getLogger(__name__)


def _start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat),
    or None without /proc (macOS) or without such a process."""
    try:
        stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
        return int(stat[stat.rindex(')') + 1:].split()[19])  # the name, (2), may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    """This boot of the machine (Linux), or None."""
    try:
        return pathlib.Path('/proc/sys/kernel/random/boot_id').read_text().strip() or None
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class WorkdirLock:
    """Context manager holding WORKDIR/.lock for `command` (e.g. 'pretrain')."""

    def __init__(self, workdir, command: str, enabled: bool = True):
        self.path = absolute_path(workdir) / LOCK_FILENAME
        self.command, self.enabled = command, enabled
        self.token = uuid.uuid4().hex
        self.boot_id, self.pid_start = _boot_id(), _start_time(os.getpid())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {'host': socket.gethostname(), 'pid': os.getpid(), 'command': self.command,
                'token': self.token, 'started': self._started, 'heartbeat': time.time(),
                'boot_id': self.boot_id, 'pid_start': self.pid_start}

    def holder(self) -> dict | None:
        """The lock's content, or None if there is none (an unreadable lock is stale)."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}

    def stale_reason(self, holder: dict) -> str | None:
        """Why `holder` (a lock's content) is dead, or None while it may be alive."""
        if not holder:
            return 'the lock file is empty or torn'  # its writer died while writing it
        if holder.get('host') == socket.gethostname() and not is_remote(self.path):
            return self._dead_here(holder)
        age = time.time() - float(holder.get('heartbeat', 0))
        return f'no heartbeat for {age:.0f} s' if age > STALE_S else None

    def _dead_here(self, holder: dict) -> str | None:
        boot = holder.get('boot_id')
        if boot and self.boot_id and boot != self.boot_id:
            return 'this machine has restarted since'
        pid = int(holder.get('pid', -1))
        if not _alive(pid):
            return 'that process has exited'
        started, now = holder.get('pid_start'), _start_time(pid)
        if started is not None and now is not None and int(started) != now:
            return f'pid {pid} is now another process'
        return None

    def _refuse(self, holder: dict) -> ConfigError:
        since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))
        return ConfigError(
            f'--workdir: {self.path.parent} is in use by {holder.get("command", "a run")} '
            f'(pid {holder.get("pid")} on {holder.get("host")}, since {since}); wait for it or '
            'stop it (a lock of a dead process is taken over)')

    def acquire(self) -> None:
        if not self.enabled:
            return
        self._started = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed, then taken like a fresh one
            if self._create():
                break
            holder = self.holder()
            if holder is None:
                continue  # released meanwhile
            reason = self.stale_reason(holder)
            if reason is None:
                raise self._refuse(holder)
            log.info('taking over the lock of %s (pid %s on %s): %s',
                     holder.get('command', 'a run'), holder.get('pid'), holder.get('host'), reason)
            self.path.unlink(missing_ok=True)
        else:
            raise self._refuse(self.holder() or {})
        self._thread = threading.Thread(target=self._beat, name='workdir-lock', daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        data = json.dumps(self._record())
        if is_remote(self.path):
            if self.path.exists():
                return False
            self.path.write_text(data)
            time.sleep(_SETTLE_S)
            return (self.holder() or {}).get('token') == self.token
        try:
            fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'w') as f:
            f.write(data)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if (self.holder() or {}).get('token') != self.token:
                return  # taken over (we were judged dead): leave it alone
            try:  # atomic replace: a reader never sees a half-written lock
                write_bytes_atomic(self.path, json.dumps(self._record()).encode())
            except OSError as e:  # e.g. a full disk: the run goes on; the lock may go stale
                log.warning('workdir lock heartbeat failed (%s); retrying in %.0f s', e,
                            HEARTBEAT_S)

    def release(self) -> None:
        if not self.enabled or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._thread = None
        if (self.holder() or {}).get('token') == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def workdir_lock(workdir, command: str) -> Iterator[WorkdirLock]:
    """Process 0 holds WORKDIR/.lock for the body; if it cannot, every process stops."""
    lock = WorkdirLock(workdir, command, enabled=distributed.is_main())
    with distributed.main_first('workdir lock'):
        lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
