"""The prepared-data format: packed sequences in sharded array_record files + index.json.

A prepared directory holds, per split, shard files `{split}-{unit}-{part}.array_record`
(at most RECORDS_PER_FILE sequences each, per work unit of the preparation) and
`index.json`, written last: a directory without it is incomplete and never read. A
record is one sequence: its input ids as raw bytes of the index's dtype (uint16 when the
vocabulary fits). Segment ids are not stored: readers recompute them from the [SEP]s
(`segments_of`), which halves the files; ids are cast to int32.

Damage: index.json records each shard's size; opening a split checks that every shard is
there with that size (a stat per file), and a record whose Riegeli hash does not match
(a changed byte) fails when it is read. Either is one line naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from engine.errors import ConfigError
from engine.paths import is_remote, write_bytes_atomic
from text.tokenizer import PAD_ID, SEP_ID

INDEX_FILENAME = 'index.json'
FORMAT_VERSION = 1
SPLITS = ('train', 'validation')
KEYS = ('input_ids', 'segment_ids')
# group_size:1 keeps every record separately addressable (random access without reading
# neighbours); token ids barely compress, so no compression.
WRITER_OPTIONS = 'group_size:1,uncompressed'
# array_record's cost of reading one record grows with the records in its file (about
# 10 us at 4,096, 135 us at 75,000 here), and a batch reads rows from many files.
RECORDS_PER_FILE = 4096


def token_dtype(vocab_size: int) -> str:
    """uint16 halves the files when every id fits, else int32."""
    return 'uint16' if vocab_size <= np.iinfo(np.uint16).max + 1 else 'int32'


def encode_rows(input_ids: np.ndarray, dtype: str) -> list[bytes]:
    """One record per row of (n, seq_len) input ids."""
    return [row.tobytes() for row in np.asarray(input_ids).astype(dtype)]


def segments_of(input_ids: np.ndarray) -> np.ndarray:
    """The packer's segment ids, recomputed from the ids: a window's first piece is
    segment 1 and each [SEP] closes one ([SEP] itself belongs to the piece it ends);
    [PAD] is 0."""
    is_sep = (input_ids == SEP_ID).astype(np.int32)
    segments = 1 + np.cumsum(is_sep, axis=1, dtype=np.int32) - is_sep
    return np.where(input_ids == PAD_ID, 0, segments).astype(np.int32)


def decode_records(records: Sequence[bytes], seq_len: int, dtype: str) -> dict[str, np.ndarray]:
    """Records -> int32 'input_ids' and 'segment_ids' of shape (len(records), seq_len)."""
    flat = np.frombuffer(b''.join(records), dtype=dtype)
    ids = flat.reshape(len(records), seq_len).astype(np.int32)
    return {'input_ids': ids, 'segment_ids': segments_of(ids)}


def shard_name(split: str, unit: int, part: int) -> str:
    return f'{split}-{unit:05d}-{part:04d}.array_record'


def shard_unit(name: str) -> int:
    """The preparation unit that wrote shard `name`."""
    return int(name.rsplit('-', 2)[1])


class ShardWriter:
    """Streams one unit's records of one split into array_record files of at most
    RECORDS_PER_FILE records each. Files get their names only when `close` succeeds (a
    crash leaves temporary files, never a short shard)."""

    def __init__(self, directory: str, split: str, unit: int):
        self.directory, self.split, self.unit = directory, split, unit
        self.files: list[dict] = []  # {'file', 'sequences', 'bytes'} of the finished parts
        self._tmp: list[str] = []
        self._writer = None
        self._count = 0

    def _open(self) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        name = shard_name(self.split, self.unit, len(self.files))
        self._tmp.append(os.path.join(self.directory, f'{name}.tmp-{os.getpid()}'))
        self._writer = ArrayRecordWriter(self._tmp[-1], WRITER_OPTIONS)
        self.files.append({'file': name, 'sequences': 0})

    def write_rows(self, input_ids: np.ndarray, dtype: str) -> None:
        for record in encode_rows(input_ids, dtype):
            if self._writer is None or self.files[-1]['sequences'] == RECORDS_PER_FILE:
                self._close_writer()
                self._open()
            self._writer.write(record)
            self.files[-1]['sequences'] += 1
        self._count += len(input_ids)

    @property
    def records(self) -> int:
        return self._count

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[dict]:
        self._close_writer()
        for tmp, entry in zip(self._tmp, self.files, strict=True):
            entry['bytes'] = os.path.getsize(tmp)  # checked when the split is opened
            os.replace(tmp, os.path.join(self.directory, entry['file']))
        return self.files

    def abort(self) -> None:
        self._close_writer()
        for tmp in self._tmp:
            if os.path.exists(tmp):
                os.unlink(tmp)


@dataclasses.dataclass(frozen=True)
class Index:
    """What index.json says: the shards of each split and how the data was made."""

    seq_len: int
    dtype: str
    shards: dict[str, list[dict]]  # split -> [{'file', 'sequences', 'bytes'}], in order
    totals: dict[str, dict]  # split -> {'sequences', 'documents', 'tokens'}
    fingerprint: str
    info: dict  # sources, tokenizer, settings and input statistics, for people

    def sequences(self, split: str) -> int:
        return sum(s['sequences'] for s in self.shards[split])

    def to_json(self) -> str:
        return json.dumps({'format_version': FORMAT_VERSION, **dataclasses.asdict(self)},
                          indent=1, sort_keys=True)


def write_index(directory: str | os.PathLike, index: Index) -> None:
    write_bytes_atomic(epath.Path(directory) / INDEX_FILENAME, index.to_json().encode())


def read_index(directory: str | os.PathLike) -> Index | None:
    """The directory's index, or None if it is absent (preparation not finished)."""
    path = epath.Path(directory) / INDEX_FILENAME
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    if raw.pop('format_version', None) != FORMAT_VERSION:
        return None  # an older layout: prepare again
    return Index(**raw)


def shard_problem(path: str, entry: dict) -> str | None:
    """Why the shard file at `path` is not the one index.json describes, or None."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        size = None
    except OSError as e:
        return f'unreadable ({e.strerror or e})'
    return size_problem(size, entry)


def size_problem(size: int | None, entry: dict) -> str | None:
    """Why a shard of `size` bytes (None: absent) is not the one index.json describes."""
    if size is None:
        return 'missing'
    want = entry.get('bytes')  # absent in directories prepared before sizes were recorded
    if want is not None and size != want:
        return f'{"truncated" if size < want else "longer than recorded"} ({size:,} bytes, ' \
               f'index.json says {want:,})'
    return None


def damaged_shards(directory: str | os.PathLike, index: Index) -> list[tuple[str, str]]:
    """(file name, problem) of each shard that is missing or has another size."""
    found = []
    for split in SPLITS:
        for entry in index.shards[split]:
            problem = shard_problem(os.path.join(os.fspath(directory), entry['file']), entry)
            if problem:
                found.append((entry['file'], problem))
    return found


def damage_error(path: str, problem: str) -> ConfigError:
    return ConfigError(f'prepared data {path} is {problem}: delete that file and rerun, '
                       'which prepares its part again (or delete the whole directory)')


@dataclasses.dataclass(frozen=True)
class _FileSpan:
    """array_record's FileInstruction protocol: all records of one file."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


class PreparedSplit:
    """Random access to one split's packed sequences over its array_record shards."""

    def __init__(self, directory: str | os.PathLike, index: Index, split: str):
        from grain import sources

        self.seq_len, self.dtype = index.seq_len, index.dtype
        shards = [s for s in index.shards[split] if s['sequences']]
        self.paths = [os.path.join(os.fspath(directory), s['file']) for s in shards]
        for path, entry in zip(self.paths, shards, strict=True):
            problem = shard_problem(path, entry)
            if problem:  # now, not as a reader's traceback many steps into training
                raise damage_error(path, problem)
        self._ends = np.cumsum([s['sequences'] for s in shards])  # to name a bad read's file
        self._len = index.sequences(split)
        # The index's counts: no file is opened until it is read (only a stat per shard,
        # above), so opening a split stays cheap for any corpus size.
        files = [_FileSpan(p, 0, s['sequences'], s['sequences'])
                 for p, s in zip(self.paths, shards, strict=True)]
        self._source = sources.ArrayRecordDataSource(files) if files else None

    def __len__(self) -> int:
        return self._len

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The sequences at `indices` (int32 arrays, one row per index)."""
        # One record at a time: grain's batched __getitems__ starts a thread pool per call,
        # which costs more than the reads (2.9 ms vs 0.4 ms for 32 rows here).
        records = []
        for i in indices:
            try:
                records.append(self._source[int(i)])
            except RuntimeError as e:  # Riegeli: 'Corrupted Riegeli/records file: ...'
                path = self.paths[int(np.searchsorted(self._ends, int(i), side='right'))]
                detail = str(e).split(' (')[0].split(';')[0].strip()[:100]
                raise damage_error(path, f'corrupted ({detail})') from None
        return decode_records(records, self.seq_len, self.dtype)


class ArraySequences:
    """The same `read` interface over packed arrays held in memory (small eval sets)."""

    def __init__(self, chunks: dict[str, np.ndarray]):
        n = len(chunks['input_ids'])
        for k, v in chunks.items():
            if len(v) != n:
                raise ValueError(f'chunks: {k!r} has {len(v)} rows, input_ids {n}')
        self._chunks = chunks
        self.seq_len = chunks['input_ids'].shape[1] if chunks['input_ids'].ndim == 2 else 0

    def __len__(self) -> int:
        return len(self._chunks['input_ids'])

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        return {k: v[idx] for k, v in self._chunks.items()}


def open_split(directory: str | os.PathLike, split: str) -> PreparedSplit:
    """One split of a local prepared directory (text.remote.RemoteSplit reads gs://)."""
    if is_remote(directory):
        raise ValueError(f'{directory}: a bucket directory; read it with text.remote')
    index = read_index(directory)
    if index is None:
        raise ValueError(f'{directory}: not prepared (no {INDEX_FILENAME})')
    return PreparedSplit(directory, index, split)
