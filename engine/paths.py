"""Workdirs and model files as local paths or cloud URLs (gs://bucket/...).

Everything a run reads or writes in its workdir goes through `etils.epath`, which serves
gs:// with gcsfs (no TensorFlow needed); orbax writes checkpoints there with tensorstore.
Two things need a local file system and stay on the host: the tokenized corpus
(array_record files, see `engine.rundir.tokenized_data_dir`) and the log files while they are being
appended to (engine.metrics_writer uploads them).
"""

import os
import pathlib
import socket
import tempfile
import threading
import urllib.parse

from etils import epath

from engine import extras
from engine.errors import ConfigError


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL such as gs://bucket/run, false for a local path."""
    return '://' in str(path)


def absolute_path(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute (orbax needs that); a URL passed through unchanged."""
    p = epath.Path(path)
    return p if is_remote(path) else epath.Path(os.path.abspath(os.fspath(p)))


def default_cache_dir() -> str:
    """This host's cache of prepared corpora: $BERTJAX_CACHE or ~/.cache/bertjax."""
    return os.environ.get('BERTJAX_CACHE') or os.path.expanduser('~/.cache/bertjax')


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes a whole file that readers never see half-written: a cloud object appears
    only when its upload completes; a local file is written beside and renamed."""
    target = absolute_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        target.write_bytes(data)
        return
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix='.tmp-')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def local_dir(path: str | os.PathLike, command: str) -> pathlib.Path:
    """`path` made absolute, for commands whose files need a local file system (an SQLite
    study, many small tables); a URL is a one-line ConfigError."""
    if is_remote(path):
        raise ConfigError(f'--workdir: launch.py {command} writes to a local directory, not '
                          f'{path}; its runs can still use gs:// init_from and data files')
    return pathlib.Path(path).absolute()


def local_file_argument(path: str, flag: str, command: str) -> str:
    """`path` for a command that writes it with the local file system; a URL is a one-line
    ConfigError before any work (instead of a folder named 'gs:' in the working directory)."""
    if is_remote(path):
        raise ConfigError(f'{flag}: launch.py {command} reads and writes {flag} on a local '
                          f'disk, not {path}; write locally, then copy it (gsutil cp -r)')
    return path


def check_workdir(workdir: str | os.PathLike) -> None:
    """A one-line ConfigError when a local --workdir names something that is not a folder."""
    path = os.fspath(workdir)
    if not is_remote(path) and os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f'--workdir: {path} exists and is not a directory')


def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """A one-line ConfigError, before any work, unless this process can write in the local
    `folder` (created later if missing: then its nearest existing parent is what must take
    a new entry). A file is created and removed there: the permission bits alone would not
    tell (root ignores them; a read-only mount or an immutable folder keeps them). A URL is
    not probed: a bucket's permissions show on the first write, in one line."""
    if is_remote(folder):
        return
    target = pathlib.Path(os.path.abspath(os.fspath(folder)))
    existing = target
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        what = 'exists and is not a directory' if existing == target else (
            f'cannot be created: {existing} is not a directory')
        raise ConfigError(f'{flag}: {target} {what}')
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix='.write-probe-')
    except OSError as e:
        reason = e.strerror or type(e).__name__
        where = '' if existing == target else f' (to create {target})'
        raise ConfigError(f'{flag}: cannot write in {existing}{where}: {reason}; give a '
                          'writable path or fix its permissions') from None
    os.close(fd)
    os.unlink(probe)


PROBE_TIMEOUT_S = 5.0  # one connection attempt, name lookup included: far below gcsfs' retries


def _gcs_endpoint() -> tuple[str, int]:
    """The host and port gcsfs sends requests to: STORAGE_EMULATOR_HOST when set (a local
    server, as in the tests), else the public JSON API endpoint."""
    location = os.environ.get('STORAGE_EMULATOR_HOST', '')
    if location in ('', 'default'):
        return 'storage.googleapis.com', 443
    if '://' not in location:
        location = f'http://{location}'
    url = urllib.parse.urlsplit(location)
    return url.hostname or 'localhost', url.port or (443 if url.scheme == 'https' else 80)


def _connect(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection to host:port opens within `timeout` seconds (the name
    lookup included, which the socket timeout alone does not bound), else why not."""
    outcome: list[str | None] = []

    def attempt():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except TimeoutError:
            outcome.append(f'no answer within {timeout:g} s')
        except OSError as e:
            outcome.append(e.strerror or str(e) or type(e).__name__)

    thread = threading.Thread(target=attempt, daemon=True, name='gcs-probe')
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f'no answer within {timeout:g} s'


def check_reachable(workdir: str | os.PathLike, timeout: float = PROBE_TIMEOUT_S) -> None:
    """For a gs:// workdir, one quick connection to the storage endpoint before anything is
    written: without network a one-line ConfigError within seconds, instead of a minute of
    gcsfs retries, a long traceback and a local folder named 'gs:'. A local path is not
    probed; nor are credentials (a request without them fails fast on its own)."""
    path = os.fspath(workdir)
    if not path.startswith('gs://'):
        return
    extras.require('gcsfs', f'--workdir {path}')  # etils reaches gs:// through gcsfs
    proxied = any(os.environ.get(k) for k in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY'))
    if proxied and not os.environ.get('STORAGE_EMULATOR_HOST'):
        return  # the way out is a proxy: a direct connection proves nothing
    bucket = path[len('gs://'):].split('/', 1)[0]
    host, port = _gcs_endpoint()
    reason = _connect(host, port, timeout)
    if reason is not None:
        raise ConfigError(f'--workdir: cannot reach gs://{bucket} ({host}:{port}: {reason}); '
                          'check the network and credentials')


def open_workdir(workdir: str | os.PathLike) -> epath.Path:
    """The workdir a run writes: made absolute (or gs://), checked to be a folder and
    reachable (one line each, before anything is written), and created."""
    path = absolute_path(workdir)
    check_workdir(path)
    check_reachable(path)  # gs:// without network: one line now, not retries
    path.mkdir(parents=True, exist_ok=True)
    return path
