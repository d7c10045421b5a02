"""A local Google Cloud Storage server for tests: gs:// workdirs without a cloud account.

gcp-storage-emulator serves the GCS JSON API from memory. gcsfs (etils.epath's gs://
backend) finds it through STORAGE_EMULATOR_HOST and tensorstore (orbax's checkpoint
writer) through TENSORSTORE_GCS_HTTP_URL, so both see one bucket, as on real GCS.
"""

import contextlib
import http.server
import logging
import os
import pathlib
import socket
import sys
from collections.abc import Iterator

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

BUCKET = 'bucket'
_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    """The emulator's download, plus the x-goog-generation header that real GCS sends
    and tensorstore requires to read an object."""
    try:
        obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
        response['x-goog-generation'] = obj['generation']
        response['x-goog-metageneration'] = obj['metageneration']
    except Exception:  # a missing object: the original handler answers 404
        pass
    return _download(request, response, storage, *args, **kwargs)


def _patch_downloads() -> None:
    objects.download = _download_with_generation  # objects.get calls it for alt=media
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is _download:
                handlers[method] = _download_with_generation


def _quiet_disconnects(httpd) -> None:
    """Clients (tensorstore) may close a connection before the reply is written; the
    emulator would print each such BrokenPipeError's traceback."""
    default = httpd.handle_error

    def handle_error(request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            default(request, client_address)
    httpd.handle_error = handle_error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fake_gcs() -> Iterator[str]:
    """Serves an empty in-memory bucket `gs://bucket` while the context is open; the
    environment (inherited by subprocesses) points gcsfs and tensorstore at it."""
    import gcsfs
    from etils.epath import backend
    _patch_downloads()
    # The emulator serves one request at a time from a listen queue of 5: concurrent range
    # reads (gcsfs sends a batch's at once) would overflow it and wait for SYN retries.
    http.server.HTTPServer.request_queue_size = 1024
    port = _free_port()
    gcs = server.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET)
    gcs.start()
    _quiet_disconnects(gcs._api._httpd)
    # gcsfs warns on every call that it cannot ask an emulator, without credentials, whether
    # the bucket is zonal; real GCS answers once.
    gcsfs_log = logging.getLogger('gcsfs')
    gcsfs_level = gcsfs_log.level
    gcsfs_log.setLevel(logging.ERROR)
    url = f'http://127.0.0.1:{port}'
    saved = {k: os.environ.get(k) for k in ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL')}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    gcsfs.GCSFileSystem.clear_instance_cache()  # a cached client would keep its endpoint
    type(backend.fsspec_backend)._get_filesystem.cache_clear()
    try:
        yield f'gs://{BUCKET}'
    finally:
        gcs.stop()
        gcsfs_log.setLevel(gcsfs_level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        gcsfs.GCSFileSystem.clear_instance_cache()
        type(backend.fsspec_backend)._get_filesystem.cache_clear()


def download(url: str, target: pathlib.Path) -> pathlib.Path:
    """Copies every object under `url` into the local directory `target`."""
    from etils import epath
    root = epath.Path(url)
    prefix = url.split('://', 1)[1].rstrip('/')  # walk() names directories without gs://
    for directory, _, files in root.walk():
        relative = str(directory).split('://', 1)[-1][len(prefix):].lstrip('/')
        for name in files:
            local = target / relative / name
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes((root / relative / name).read_bytes())
    return target
