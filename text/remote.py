"""Prepared data read straight from a bucket: the records a host needs, each run of
consecutive ones by one byte-range read, through a bounded least-recently-used cache on
local disk. No shard is ever copied whole.

A shard (written with records.WRITER_OPTIONS: one record per chunk, uncompressed) is a
Riegeli file: 64 KiB blocks, each opening with a 24-byte block header, carrying one
stream of chunks. Chunk 0 is the 40-byte file signature; chunk k + 1 holds record k: a
40-byte chunk header, 0 (no compression), the size of the sizes, the record's size as
varints, then the record. Every record of a prepared split has the same size, so record
k's place follows from k alone (no footer is read). Each read is checked against the
header it must have (type, counts, sizes): a file of another layout, or a misplaced read,
is a one-line damage error, never wrong tokens. The stat at open (a shard's size against
index.json) finds missing and truncated shards, as on disk. (Riegeli's HighwayHash of the
data is not recomputed here; GCS checks objects with its own CRC32C.)
"""

from __future__ import annotations

import collections
import os
import struct
import sys
import threading
from collections.abc import Sequence

import numpy as np

from engine.errors import ConfigError
from text import records

BLOCK = 1 << 16
BLOCK_HEADER = 24
USABLE = BLOCK - BLOCK_HEADER  # stream bytes per block
CHUNK_HEADER = 40
FIRST_RECORD_CHUNK = CHUNK_HEADER  # stream position after the signature chunk
DISK_BLOCK = 4096  # a cached file is charged whole filesystem blocks


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def physical(position: int) -> int:
    """The file offset of stream position `position` (block headers skipped)."""
    block, within = divmod(position, USABLE)
    return block * BLOCK + BLOCK_HEADER + within


class Layout:
    """Where record k of a shard of `record_bytes`-byte records lies, and what surrounds it."""

    def __init__(self, record_bytes: int):
        size = _varint(record_bytes)
        self.prefix = b'\x00' + _varint(len(size)) + size  # compression, sizes' size, size
        self.record_bytes = record_bytes
        self.chunk = CHUNK_HEADER + len(self.prefix) + record_bytes
        data_size = len(self.prefix) + record_bytes
        # Header bytes 8:16 (data size) and 24:40 (type 'r', 1 record, decoded size); the
        # hashes (0:8, 16:24) are not checked.
        self.data_size = struct.pack('<Q', data_size)
        self.kind = b'r' + (1).to_bytes(7, 'little') + struct.pack('<Q', record_bytes)

    def span(self, k: int, count: int = 1) -> tuple[int, int]:
        """The file's byte range [start, end) holding the chunks of records k..k+count-1."""
        begin = FIRST_RECORD_CHUNK + k * self.chunk
        return physical(begin), physical(begin + count * self.chunk - 1) + 1

    def records(self, raw: bytes, start: int, count: int) -> list[bytes]:
        """The `count` records in the raw range read at file offset `start`; ValueError if
        it is not `count` record chunks of this layout."""
        if len(raw) > count * self.chunk:  # the range crossed block headers: drop them
            parts, offset = [], start
            while offset < start + len(raw):
                within = offset % BLOCK
                if within < BLOCK_HEADER:
                    offset += BLOCK_HEADER - within
                    continue
                end = min(start + len(raw), offset - within + BLOCK)
                parts.append(raw[offset - start:end - start])
                offset = end
            raw = b''.join(parts)
        if len(raw) != count * self.chunk:
            raise ValueError(f'{len(raw)} bytes where {count * self.chunk} belong')
        head, out = CHUNK_HEADER + len(self.prefix), []
        for at in range(0, len(raw), self.chunk):
            chunk = raw[at:at + self.chunk]
            if (chunk[8:16] != self.data_size or chunk[24:40] != self.kind
                    or chunk[CHUNK_HEADER:head] != self.prefix):
                raise ValueError('not a record chunk where one belongs')
            out.append(chunk[head:])
        return out


def runs(places: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Sorted distinct (shard, record) -> (shard, first record, count) of consecutive ones:
    one range read each."""
    out: list[list[int]] = []
    for shard, k in places:
        if out and out[-1][0] == shard and out[-1][1] + out[-1][2] == k:
            out[-1][2] += 1
        else:
            out.append([shard, k, 1])
    return [tuple(r) for r in out]


class RecordCache:
    """Records on local disk, at most `max_bytes` (files charged in whole 4 KiB blocks),
    least recently used out. Files outlive the process: a restart finds them (oldest
    written first out). Thread-safe (grain reads batches in several threads)."""

    def __init__(self, directory: str, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        os.makedirs(directory, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.total = 0
        found = []
        for entry in os.scandir(directory):
            if entry.name.endswith('.tmp'):
                os.unlink(entry.path)  # a write cut short
            else:
                stat = entry.stat()
                found.append((stat.st_mtime_ns, entry.name, self.charge(stat.st_size)))
        for _, name, charge in sorted(found):
            self._entries[name] = charge
            self.total += charge
        with self._lock:
            self._evict(0)

    @staticmethod
    def charge(size: int) -> int:
        return max(1, -(-size // DISK_BLOCK)) * DISK_BLOCK

    def _evict(self, room: int) -> None:
        while self._entries and self.total + room > self.max_bytes:
            name, charge = self._entries.popitem(last=False)
            self.total -= charge
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass

    def get(self, name: str) -> bytes | None:
        with self._lock:
            if name not in self._entries:
                return None
            self._entries.move_to_end(name)
        try:
            with open(os.path.join(self.directory, name), 'rb') as f:
                return f.read()
        except FileNotFoundError:  # evicted by another thread meanwhile
            return None

    def put(self, name: str, data: bytes) -> None:
        charge = self.charge(len(data))
        if charge > self.max_bytes:
            return
        with self._lock:
            if name in self._entries:
                return
            self._evict(charge)  # room first: the directory never exceeds the bound
            self._entries[name] = charge
            self.total += charge
        path = os.path.join(self.directory, name)
        try:
            with open(f'{path}.tmp', 'wb') as f:
                f.write(data)
            os.replace(f'{path}.tmp', path)
        except OSError as e:  # a full or failing disk: the cache is only a speed-up
            self._give_up(name, f'{path}.tmp', e)

    def drop(self, name: str) -> None:
        """Forgets `name` and deletes its file (a damaged one is then fetched again)."""
        with self._lock:
            charge = self._entries.pop(name, None)
            if charge is None:
                return
            self.total -= charge
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass

    def _give_up(self, name: str, tmp: str, error: OSError) -> None:
        """Stops caching for the rest of the process, saying so once; reads go on from the
        bucket, so training continues with the same data."""
        self.drop(name)  # charged in put, never written
        with self._lock:
            was_on, self.max_bytes = self.max_bytes > 0, 0
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if was_on:
            print(f'warning: data.cache_mb: cannot write the record cache in {self.directory} '
                  f'({error.strerror or error}); reading from the bucket without it from now '
                  'on', file=sys.stderr, flush=True)


_CACHES: dict[str, RecordCache] = {}
_CACHES_LOCK = threading.Lock()


def shared_cache(directory: str, max_bytes: int) -> RecordCache:
    """One RecordCache per directory in this process (the splits of a run share it)."""
    with _CACHES_LOCK:
        cache = _CACHES.get(directory)
        if cache is None or cache.max_bytes != max_bytes:
            cache = _CACHES[directory] = RecordCache(directory, max_bytes)
        return cache


def _filesystem(directory: str):
    import fsspec
    return fsspec.core.url_to_fs(directory)


class RemoteSplit:
    """One split of a prepared directory in a bucket, with PreparedSplit's interface:
    `read(indices)` fetches only the pages of `page_rows` consecutive records holding
    those records (the misses of `cache`, all at once: one range read per run of
    consecutive records of a shard, concurrently). A page is the unit of the cache too:
    page_rows = data.read_block, the runs the batches draw."""

    def __init__(self, directory: str, index: records.Index, split: str,
                 cache: RecordCache | None = None, page_rows: int = 1):
        self.seq_len, self.dtype = index.seq_len, index.dtype
        self.layout = Layout(index.seq_len * np.dtype(index.dtype).itemsize)
        self.fs, root = _filesystem(directory)
        shards = [s for s in index.shards[split] if s['sequences']]
        self.urls = [f'{directory.rstrip("/")}/{s["file"]}' for s in shards]
        self.paths = [f'{root.rstrip("/")}/{s["file"]}' for s in shards]
        sizes = remote_sizes(self.fs, root)
        for url, entry in zip(self.urls, shards, strict=True):
            problem = records.size_problem(sizes.get(entry['file']), entry)
            if problem:  # now, not many steps into training
                raise records.damage_error(url, problem)
        self._ends = np.cumsum([s['sequences'] for s in shards])
        self._len = index.sequences(split)
        self.cache, self.page_rows = cache, max(1, page_rows)
        self._key = f'{index.fingerprint[:16]}-{split}-{self.page_rows}-'
        self._lock = threading.Lock()
        self.bytes_read = self.ranges_read = self.records_read = 0  # from the bucket

    def __len__(self) -> int:
        return self._len

    def _locate(self, i: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._ends, i, side='right'))
        return shard, i - (int(self._ends[shard - 1]) if shard else 0)

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The sequences at `indices` (int32 arrays, one row per index)."""
        rows = [int(i) for i in indices]
        for i in rows:
            if not 0 <= i < self._len:
                raise IndexError(f'record {i} not in [0, {self._len})')
        size, span = self.layout.record_bytes, self.page_rows
        pages: dict[int, bytes] = {}
        wanted = sorted({i // span for i in rows})
        if self.cache is not None:
            for page in wanted:
                data = self.cache.get(f'{self._key}{page}')
                if data is None:
                    continue
                if len(data) == len(self._page_rows(page)) * size:
                    pages[page] = data
                else:  # cut short (a crash before the disk had it): fetched again
                    self.cache.drop(f'{self._key}{page}')
        missing = [p for p in wanted if p not in pages]
        if missing:
            members = {p: self._page_rows(p) for p in missing}
            fetched = self._fetch([self._locate(i) for p in missing for i in members[p]])
            for page in missing:
                pages[page] = b''.join(fetched[self._locate(i)] for i in members[page])
                if self.cache is not None:
                    self.cache.put(f'{self._key}{page}', pages[page])
        out = [pages[i // span][(i % span) * size:(i % span + 1) * size] for i in rows]
        return records.decode_records(out, self.seq_len, self.dtype)

    def _page_rows(self, page: int) -> range:
        """The records of `page` (the last page of a split may be short)."""
        return range(page * self.page_rows, min((page + 1) * self.page_rows, self._len))

    def _fetch(self, places: list[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """(shard, record) -> record bytes from the bucket: a range read per run."""
        todo = runs(places)
        spans = [self.layout.span(k, count) for _, k, count in todo]
        raws = self.fs.cat_ranges([self.paths[s] for s, _, _ in todo],
                                  [a for a, _ in spans], [b for _, b in spans])
        with self._lock:
            self.ranges_read += len(todo)
            self.records_read += len(places)
            self.bytes_read += sum(len(r) for r in raws if isinstance(r, bytes))
        found = {}
        for (shard, first, count), (start, _), raw in zip(todo, spans, raws, strict=True):
            url = self.urls[shard]
            if isinstance(raw, Exception):  # after gcsfs's own retries
                detail = str(raw).splitlines()[0][:200] if str(raw) else ''
                raise ConfigError(f'prepared data {url}: a range read failed after retries '
                                  f'({type(raw).__name__}: {detail}); is the bucket '
                                  'reachable? The run resumes from its last checkpoint')
            try:
                data = self.layout.records(raw, start, count)
            except ValueError as e:
                raise records.damage_error(url, f'not in the expected layout at records '
                                                f'{first}-{first + count - 1} ({e})') from None
            found.update(((shard, first + j), record) for j, record in enumerate(data))
        return found


def remote_sizes(fs, root: str) -> dict[str, int]:
    """File name -> size of every object in a bucket directory (one listing)."""
    try:
        entries = fs.ls(root, detail=True, refresh=True)
    except FileNotFoundError:
        return {}
    return {e['name'].rstrip('/').rsplit('/', 1)[-1]: int(e.get('size') or 0) for e in entries
            if e.get('type') == 'file'}


def damaged_shards(directory: str, index: records.Index) -> list[tuple[str, str]]:
    """records.damaged_shards for a bucket directory, from one listing (no download)."""
    fs, root = _filesystem(directory)
    sizes = remote_sizes(fs, root)
    return [(e['file'], problem) for split in records.SPLITS for e in index.shards[split]
            if (problem := records.size_problem(sizes.get(e['file']), e))]
