"""Why a TFDS dataset cannot be opened, in words that say what to run.

The project reads TFDS datasets by index (`tfds.data_source`), which needs array_record
files; `tfds build NAME` writes TFRecord unless told otherwise (tensorflow-datasets 4.9).
A dataset built that way is on disk but unreadable here, so the message names the file
format and the build command that fixes it, rather than "not prepared". Only file names
are read: no TensorFlow, no network.
"""

from __future__ import annotations

import os
import pathlib
import re

READABLE_FORMAT = 'array_record'
# TFDS's record files: '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'.
_RECORD_FILE = re.compile(r'\.([a-z_]+)-\d{5}-of-\d{5}$')
_INCOMPLETE_PREFIX = 'incomplete.'  # a build in progress or interrupted


def build_command(name: str, overwrite: bool = False) -> str:
    """The command that prepares `name` ('glue/sst2', maybe ':VERSION') readably; with
    --overwrite where a build in another format exists (tfds would reuse it otherwise)."""
    command = f'tfds build {name.partition(":")[0]} --file_format={READABLE_FORMAT}'
    return f'{command} --overwrite' if overwrite else command


def _data_dirs() -> list[pathlib.Path]:
    from tensorflow_datasets.core.utils import file_utils  # TFDS_DATA_DIR and registered ones
    return [pathlib.Path(os.fspath(d)).expanduser() for d in file_utils.list_data_dirs()]


def built_formats(name: str) -> dict[str, str]:
    """{file format: its version folder} of the builds of `name` in the TFDS data dirs."""
    base, _, version = name.partition(':')
    found: dict[str, str] = {}
    for data_dir in _data_dirs():
        root = data_dir / base
        if not root.is_dir():
            continue
        for info in sorted(root.rglob('dataset_info.json')):
            folder = info.parent
            if folder.name.startswith(_INCOMPLETE_PREFIX) or (version and
                                                               folder.name != version):
                continue
            for path in folder.iterdir():
                match = _RECORD_FILE.search(path.name)
                if match:
                    found.setdefault(match.group(1), str(folder))
    return found


def not_readable(name: str, split: str, key: str, error: Exception | None = None) -> str:
    """The one-line message for a dataset split that tfds.data_source could not open."""
    try:
        formats = built_formats(name)
    except OSError:  # an unreadable data dir: say what is known
        formats = {}
    if formats and READABLE_FORMAT not in formats:
        folder = next(iter(formats.values()))
        return (f'{key}: TFDS dataset {name!r} is prepared in {folder} as '
                f'{", ".join(sorted(formats))} files, but it is read by index, which needs '
                f'{READABLE_FORMAT}: rebuild it with `{build_command(name, overwrite=True)}` '
                'and copy the result there')
    where = os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
    message = (f'{key}: TFDS dataset {name!r} split {split!r} is not prepared under {where}; '
               f'prepare it with `{build_command(name)}` on a machine with internet and copy '
               'it there (or set TFDS_DATA_DIR)')
    if error is not None:
        first = (str(error).splitlines() or [''])[0]
        message += f' ({type(error).__name__}: {first[:200]})'
    return message
