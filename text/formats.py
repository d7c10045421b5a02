"""Corpus file formats: plain text, JSONL, Parquet, and .gz/.zst of text or JSONL.

A file's format is its name: `x.txt` (anything else: plain text), `x.jsonl` / `x.ndjson`
(one JSON object per line, the document in `data.text_field`, a dotted path for nested
objects), `x.parquet` (the column `data.text_field`, dotted for struct fields), each
optionally `.gz` or `.zst` compressed (not Parquet, which compresses inside). Files are
local or gs:// (etils.epath) and always streamed: memory holds one read block (or one
Parquet row group's column), whatever the file size.

Units (text.units) of a file depend only on the file and `unit_bytes`: an uncompressed
text or JSONL file is cut at line starts, a Parquet file at row-group starts (a unit
reads the row groups that start in its byte range), and a compressed file, which can
only be read from its start, is one whole unit.

Bad input follows data.bad_input: a record without the field (or null), a non-string
field, a line that is not JSON or not UTF-8 (inside compressed files), and corrupt
compressed data (the rest of that file is lost) are counted with their first
file:line ('skip') or stop the preparation with that file:line ('error').
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib
from collections.abc import Iterator

from etils import epath

from engine import extras
from engine.paths import is_remote

COMPRESSIONS = {'.gz': 'gz', '.zst': 'zst'}
JSONL_SUFFIXES = ('.jsonl', '.ndjson')
PARQUET_SUFFIX = '.parquet'
READ_BLOCK = 1 << 20  # bytes per read of an uncompressed file
STREAM_BLOCK = 1 << 16  # decompressed bytes per read: what corrupt data can take with it
PARQUET_BATCH_ROWS = 1024
MISSING = object()  # a record without the text field
NOT_JSON = object()  # a line that is no JSON object


@dataclasses.dataclass(frozen=True)
class Format:
    """How a file is read: `kind` 'text', 'jsonl' or 'parquet'; `compression` None, 'gz'
    or 'zst'."""

    kind: str
    compression: str | None = None

    @property
    def plain(self) -> bool:
        """Uncompressed plain text: read by text.units' own byte-range reader."""
        return self.kind == 'text' and self.compression is None

    @property
    def records(self) -> bool:
        """Documents are records with a text field (JSONL, Parquet), not lines."""
        return self.kind != 'text'


def file_format(path: str) -> Format:
    """The format named by `path`'s suffixes."""
    name = os.path.basename(str(path)).lower()
    stem, ext = os.path.splitext(name)
    compression = COMPRESSIONS.get(ext)
    if compression:
        name = stem
    if name.endswith(JSONL_SUFFIXES):
        return Format('jsonl', compression)
    if name.endswith(PARQUET_SUFFIX) and compression is None:
        return Format('parquet')
    return Format('text', compression)


def open_binary(path: str):
    """`path` (local or gs://) opened for binary reading."""
    return epath.Path(path).open('rb') if is_remote(path) else open(path, 'rb')


def file_size(path: str) -> int:
    return epath.Path(path).stat().length if is_remote(path) else os.path.getsize(path)


class BadRecord(Exception):
    """Bad input at `where` ('path:line' or 'path row N') under data.bad_input='error'."""

    def __init__(self, where: str, reason: str):
        super().__init__(where, reason)
        self.where, self.reason = where, reason

    def message(self, key: str) -> str:
        return (f'{key}: {self.where}: {self.reason} (data.bad_input=error; set it to '
                "'skip' to drop such input)")


def reasons(field: str) -> dict[str, str]:
    """Short names of the kinds of bad records -> how a summary or error says them."""
    return {'missing': f"no string field {field!r} (data.text_field)",
            'non_string': f"field {field!r} is not a string (data.text_field)",
            'json': 'not a JSON object', 'utf8': 'not valid UTF-8',
            'corrupt': 'corrupt compressed data (the rest of the file is lost)'}


# ---------------------------------------------------------------- compressed streams


def _decompressor(raw, compression: str):
    if compression == 'gz':
        return gzip.GzipFile(fileobj=raw, mode='rb')
    zstandard = extras.require('zstandard', 'reading .zst files')
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def sniff(path: str, fmt: Format, size: int) -> str | None:
    """'empty', 'binary', 'corrupt' or None for a usable file that text.units does not
    sniff itself (compressed or Parquet)."""
    if fmt.kind == 'parquet':
        pq = parquet_module()  # its ConfigError is no 'corrupt' file
        try:
            with open_binary(path) as f:
                if not pq.ParquetFile(f).metadata.num_rows:
                    return 'empty'
        except (OSError, ValueError, EOFError) as e:  # pyarrow.ArrowInvalid is a ValueError
            return 'corrupt' if not isinstance(e, FileNotFoundError) else 'unreadable'
        return None
    if fmt.compression == 'zst':
        extras.require('zstandard', 'reading .zst files')
    try:
        with open_binary(path) as raw, _decompressor(raw, fmt.compression) as f:
            head = f.read(8192)
    except _corrupt_errors():
        return 'corrupt'
    except OSError:
        return 'unreadable'
    if not head.strip():
        return 'empty' if len(head) < 8192 else None
    return 'binary' if b'\0' in head else None


# ---------------------------------------------------------------- lines


class _Lines:
    """Numbered, decoded lines of a binary stream, a block at a time; undecodable lines
    are recorded and come out as ''."""

    def __init__(self, path: str, bad, policy: str, first_line):
        self.path, self.bad, self.policy = path, bad, policy
        self._first_line = first_line  # () -> number of the stream's first line (lazily)
        self.done = 0  # lines yielded before the current block

    def where(self, index: int) -> str:
        """'path:line' of the index-th line of the stream (0-based)."""
        return f'{self.path}:{self._first_line() + index}'

    def record(self, kind: str, index: int, reason: str) -> None:
        if self.policy == 'error':
            raise BadRecord(self.where(index), reason)
        self.bad.add_record(kind, reason, self.where(index))

    def decode(self, data: bytes) -> list[str]:
        try:  # whole-block decoding is the fast path; per line only to find bad lines
            lines = data.decode('utf-8').split('\n')
        except UnicodeDecodeError:
            lines = []
            for i, raw in enumerate(data.split(b'\n')):
                try:
                    lines.append(raw.decode('utf-8'))
                except UnicodeDecodeError:
                    self.record('utf8', self.done + i, 'not valid UTF-8')
                    lines.append('')
        if lines and lines[-1] == '':
            lines.pop()  # after the last '\n'
        return lines

    def blocks(self, read, raw_position, limit: int | None = None
               ) -> Iterator[tuple[list[str], int]]:
        """(lines, raw bytes consumed) per block: `read(n)` gives decoded-stream bytes,
        `raw_position()` the input bytes consumed so far; at most `limit` stream bytes
        (None: a decompressed stream, read to its end)."""
        carry, left, seen = b'', limit, raw_position()
        while left is None or left > 0:
            block = read(STREAM_BLOCK if left is None else min(READ_BLOCK, left))
            if not block:
                break
            if left is not None:
                left -= len(block)
            data = carry + block
            cut = data.rfind(b'\n') + 1
            data, carry = data[:cut], data[cut:]
            lines = self.decode(data)
            position = raw_position()
            yield lines, position - seen
            seen = position
            self.done += len(lines)
        if carry:
            yield self.decode(carry + b'\n'), raw_position() - seen
            self.done += 1


def line_blocks(path: str, fmt: Format, start: int, end: int, bad, policy: str,
                first_line) -> Iterator[tuple[_Lines, list[str], int]]:
    """(reader, lines, input bytes) per block of [start, end) of an uncompressed file, or
    of a whole compressed file; corrupt compressed data ends the file (recorded)."""
    with open_binary(path) as raw:
        if fmt.compression is None:
            raw.seek(start)
            reader = _Lines(path, bad, policy, first_line)
            for lines, size in reader.blocks(raw.read, raw.tell, end - start):
                yield reader, lines, size
            return
        reader = _Lines(path, bad, policy, lambda: 1)
        stream = _decompressor(raw, fmt.compression)
        blocks = reader.blocks(stream.read, raw.tell)
        while True:
            try:
                lines, size = next(blocks)
            except StopIteration:
                return
            except _corrupt_errors():
                reader.record('corrupt', reader.done, reasons('')['corrupt'])
                return
            yield reader, lines, size


# ---------------------------------------------------------------- records


def field_value(obj, field: str):
    """obj[field], or along a dotted path; MISSING when absent or null."""
    if isinstance(obj, dict) and field in obj:
        value = obj[field]
    else:
        value = obj
        for part in field.split('.'):
            if not isinstance(value, dict) or part not in value:
                return MISSING
            value = value[part]
    return MISSING if value is None else value


def _texts(values, field: str, where, bad, policy: str) -> list[str]:
    """The stripped, non-empty strings of `values`; the others recorded (where(i) names
    the i-th)."""
    docs = []
    for i, value in enumerate(values):
        if isinstance(value, str):
            value = value.strip()
            if value:
                docs.append(value)
            continue
        kind = 'missing' if value is MISSING else 'json' if value is NOT_JSON else 'non_string'
        reason = reasons(field)[kind]
        if policy == 'error':
            raise BadRecord(where(i), reason)
        bad.add_record(kind, reason, where(i))
    return docs


def _json_values(lines: list[str], field: str) -> list:
    """(line index, field value) of each non-blank line, in order."""
    values = []
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue  # a blank line is no record
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        values.append((i, field_value(obj, field) if isinstance(obj, dict) else NOT_JSON))
    return values


def jsonl_batches(path: str, fmt: Format, start: int, end: int, field: str, bad,
                  policy: str, first_line) -> Iterator[tuple[list[str], int]]:
    """(documents, input bytes) per block of a JSONL range (or whole compressed file)."""
    for reader, lines, size in line_blocks(path, fmt, start, end, bad, policy, first_line):
        numbered = _json_values(lines, field)
        done = reader.done
        docs = _texts([v for _, v in numbered], field,
                      lambda i, n=numbered, d=done, r=reader: r.where(d + n[i][0]), bad, policy)
        yield docs, size


# ---------------------------------------------------------------- Parquet


def parquet_module():
    return extras.require('pyarrow.parquet', 'reading .parquet files')


def row_group_starts(path: str) -> tuple[list[int], list[int]]:
    """(byte offset, rows) of each row group of a Parquet file, from its footer."""
    with open_binary(path) as f:
        meta = parquet_module().ParquetFile(f).metadata
    starts, rows = [], []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        offsets = []
        for c in range(group.num_columns):
            column = group.column(c)
            offset = column.data_page_offset
            if column.has_dictionary_page and column.dictionary_page_offset:
                offset = min(offset, column.dictionary_page_offset)
            offsets.append(offset)
        starts.append(min(offsets) if offsets else 0)
        rows.append(group.num_rows)
    return starts, rows


def parquet_cuts(path: str, size: int, unit_bytes: int) -> list[int]:
    """Unit boundaries of a Parquet file: row-group starts about unit_bytes apart."""
    starts, _ = row_group_starts(path)
    cuts, nominal = [0], unit_bytes
    for start in starts[1:]:
        if start >= nominal and start > cuts[-1]:
            cuts.append(start)
            nominal = start + unit_bytes
    return cuts + [size]


def _parquet_column(pf, field: str, row_group: int):
    """Batches (Arrow arrays) of the field in a row group; None when it is absent."""
    import pyarrow.compute as pc
    top, *rest = field.split('.')
    if top not in pf.schema_arrow.names:
        return None
    batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[row_group],
                              columns=[top])

    def columns():
        for batch in batches:
            column = batch.column(0)
            try:
                for name in rest:
                    column = pc.struct_field(column, name)
            except (KeyError, ValueError, TypeError, NotImplementedError):
                yield None, len(batch)
                continue
            yield column, len(batch)
    return columns()


def _arrow_values(column, rows: int) -> list:
    """Python values of a column (non-strings are recorded as such by _texts)."""
    if column is None:
        return [MISSING] * rows
    return [MISSING if v is None else v for v in column.to_pylist()]


def parquet_batches(path: str, start: int, end: int, field: str, bad,
                    policy: str) -> Iterator[tuple[list[str], int]]:
    """(documents, input bytes) per batch of the row groups starting in [start, end)."""
    starts, rows = row_group_starts(path)
    bounds = starts[1:] + [file_size(path)]
    with open_binary(path) as f:
        pf = parquet_module().ParquetFile(f)
        for g, (first, span) in enumerate(zip(starts, bounds, strict=True)):
            if not start <= first < end:
                continue
            span -= first
            row = sum(rows[:g])
            columns = _parquet_column(pf, field, g)
            if columns is None:
                columns = iter([(None, rows[g])])
            for column, n in columns:
                values = _arrow_values(column, n)
                docs = _texts(values, field, lambda i, r=row: f'{path} row {r + i + 1}', bad,
                              policy)
                yield docs, span * n // max(rows[g], 1)
                row += n
