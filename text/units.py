"""Planning a preparation: inputs checked and cut into work units, and each unit's documents.

A unit is a byte range of one text file (cut at line starts, or after a blank line for
'blank_line' documents; JSONL, Parquet, compressed files: see text.formats), a run of
consecutive small files (whole, together about `unit_bytes`: their documents pack into
shared sequences as one file's lines do), or an example range of a TFDS
split. Units depend only on the inputs and `unit_bytes`, never on the number of workers
or hosts, so the prepared data is the same wherever it is made. Reading is binary: lines
end at '\\n' (a trailing '\\r' is stripped); a line that is not valid UTF-8 is reported and
skipped (or, with data.bad_input='error', stops the preparation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from engine.errors import ConfigError
from text import formats
from text.corpus import (
    DOC_SEPARATORS,
    READ_BATCH,
    as_text,
    is_indexed,
    open_indexed_split,
    parse_indexed_spec,
)

BAD_INPUT_POLICIES = ('skip', 'error')
TFDS_UNIT_EXAMPLES = 50_000
TFDS_EXAMPLE_BYTES = 1000  # a guess at an example's text size, for progress and sampling
_SNIFF_BYTES = 8192  # a NUL byte in a file's first 8 KiB marks it as binary
_READ_BLOCK = 1 << 20  # 1 MiB reads inside a unit
ENCODING_HINT = 'is the text in another encoding? convert it, e.g. iconv -f latin1 -t utf-8'


@dataclasses.dataclass(frozen=True)
class Unit:
    """One piece of work: `source`'s bytes (or TFDS examples) [start, end)."""

    number: int
    source: str
    start: int
    end: int
    role: str  # 'train': hold out by hash unless eval files are given; 'eval': all validation
    split: str = 'train'  # the TFDS split read (TFDS sources only)
    # A group of small files: every (path, start, end) in order; () for one file's range
    # (source, start, end). A group's source/start/end are its first file's.
    parts: tuple[tuple[str, int, int], ...] = ()

    @property
    def is_tfds(self) -> bool:
        """A range of examples of an indexed dataset ('tfds:' or 'hf:'), not bytes."""
        return is_indexed(self.source)

    @property
    def size(self) -> int:
        """Bytes of text (estimated for TFDS examples), for progress and scheduling."""
        if self.parts:
            return sum(end - start for _, start, end in self.parts)
        return (self.end - self.start) * (TFDS_EXAMPLE_BYTES if self.is_tfds else 1)

    def ranges(self) -> tuple[tuple[str, int, int], ...]:
        """The (path, start, end) byte ranges the unit reads, in order."""
        return self.parts or ((self.source, self.start, self.end),)


@dataclasses.dataclass
class BadInput:
    """Counts of skipped input and where the first of each kind is."""

    files: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # kind -> paths
    lines: int = 0  # lines that are not valid UTF-8
    first_line: tuple[str, int] | None = None  # (path, byte offset)
    # Bad records of JSONL, Parquet and compressed files: kind -> [count, 'path:line', reason]
    records: dict[str, list] = dataclasses.field(default_factory=dict)

    def add_line(self, path: str, offset: int) -> None:
        self.lines += 1
        if self.first_line is None:
            self.first_line = (path, offset)

    def add_record(self, kind: str, reason: str, where: str) -> None:
        self.merge_records({kind: [1, where, reason]})

    def merge_records(self, records: dict[str, list]) -> None:
        for kind, (count, where, reason) in records.items():
            entry = self.records.setdefault(kind, [0, where, reason])
            entry[0] += count

    def merge(self, other: BadInput) -> None:
        for kind, paths in other.files.items():
            self.files.setdefault(kind, []).extend(paths)
        self.merge_records(other.records)
        if other.lines and self.first_line is None:
            self.first_line = other.first_line
        self.lines += other.lines

    def summary(self) -> str:
        """One line, or '' when nothing was skipped."""
        parts = [f'{len(p)} {kind} file(s) (first: {p[0]})' for kind, p in self.files.items()]
        if self.lines:
            path, offset = self.first_line
            parts.append(f'{self.lines} line(s) of invalid UTF-8 (first: '
                         f'{path}:{line_number(path, offset)})')
        parts.extend(f'{count} record(s) with {reason} (first: {where})'
                     for count, where, reason in self.records.values())
        return 'skipped ' + ', '.join(parts) if parts else ''


def line_number(path: str, offset: int) -> int:
    """1-based number of the line that starts at byte `offset` of `path`."""
    count, done = 1, 0
    with formats.open_binary(path) as f:
        while done < offset:
            block = f.read(min(_READ_BLOCK, offset - done))
            if not block:
                break
            count += block.count(b'\n')
            done += len(block)
    return count


def _file_problem(path: str) -> str | None:
    """'unreadable', 'empty', 'binary', 'corrupt' or None for a usable input file."""
    fmt = formats.file_format(path)
    try:
        size = formats.file_size(path)
        if fmt.compression or fmt.kind == 'parquet':
            return formats.sniff(path, fmt, size)
        with formats.open_binary(path) as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return 'unreadable'
    if not head.strip():
        return 'empty' if size <= len(head) else None
    return 'binary' if b'\0' in head else None


def check_files(sources: Sequence[str], key: str, policy: str, bad: BadInput) -> list[str]:
    """The usable sources; unusable files are recorded in `bad` (policy 'skip') or a
    one-line ConfigError (policy 'error')."""
    if policy not in BAD_INPUT_POLICIES:
        raise ConfigError(f'data.bad_input: must be one of {BAD_INPUT_POLICIES}, got {policy!r}')
    usable = []
    for source in sources:
        problem = None if is_indexed(source) else _file_problem(source)
        if problem is None:
            usable.append(source)
        elif policy == 'error':
            raise ConfigError(f'{key}: {source} is {problem} (data.bad_input=error; set it to '
                              "'skip' to leave such files out)")
        else:
            bad.files.setdefault(problem, []).append(source)
    if not usable:
        raise ConfigError(f'{key}: no readable text among {len(sources)} input(s) '
                          f'({bad.summary() or "none given"})')
    return usable


def _next_boundary(f, position: int, size: int, doc_separator: str) -> int:
    """The first unit boundary at or after `position`: a line start ('line'), or the start
    of the line after a blank line ('blank_line'); `size` if there is none."""
    if position <= 0:
        return 0
    f.seek(position - 1)
    f.readline()  # to the end of the line holding byte position-1
    if doc_separator == 'line':
        return min(f.tell(), size)
    while True:
        line = f.readline()
        if not line:
            return size
        if not line.strip():
            return f.tell()


def plan_units(train: Sequence[str], evals: Sequence[str], doc_separator: str,
               unit_bytes: int) -> list[Unit]:
    """Train sources' units, then eval sources' units, numbered in that order."""
    if doc_separator not in DOC_SEPARATORS:
        raise ConfigError(f'data.doc_separator: must be one of {DOC_SEPARATORS}, '
                          f'got {doc_separator!r}')
    units: list[Unit] = []
    for role, sources in (('train', train), ('eval', evals)):
        for source, start, end, split, parts in _role_ranges(sources, role, doc_separator,
                                                              unit_bytes):
            units.append(Unit(len(units), source, start, end, role, split, parts))
    return units


def _role_ranges(sources: Sequence[str], role: str, doc_separator: str, unit_bytes: int):
    """(source, start, end, split, parts) of each unit: a big file's ranges, or a run of
    consecutive small files until they reach unit_bytes together (one small file alone
    gives a plain range, as a big file's)."""
    group: list[tuple[str, int, int]] = []
    grouped = 0  # bytes in the group
    for source in sources:
        size = None if is_indexed(source) else formats.file_size(source)
        if size is not None and size < unit_bytes:
            group.append((source, 0, size))
            grouped += size
            if grouped < unit_bytes:
                continue
        if group:
            yield *group[0], 'train', tuple(group) if len(group) > 1 else ()
            group, grouped = [], 0
        if size is None or size >= unit_bytes:
            for start, end, split in _ranges(source, role, doc_separator, unit_bytes):
                yield source, start, end, split, ()
    if group:
        yield *group[0], 'train', tuple(group) if len(group) > 1 else ()


def _ranges(source: str, role: str, doc_separator: str, unit_bytes: int):
    if is_indexed(source):
        split = 'train' if role == 'train' else 'validation'
        key = 'data.train_files' if role == 'train' else 'data.eval_files'
        n = len(open_indexed_split(source, split, key))
        return [(a, min(a + TFDS_UNIT_EXAMPLES, n), split)
                for a in range(0, n, TFDS_UNIT_EXAMPLES)]
    size, fmt = formats.file_size(source), formats.file_format(source)
    if fmt.compression:  # read only from its start: one unit
        return [(0, size, 'train')]
    if fmt.kind == 'parquet':
        cuts = formats.parquet_cuts(source, size, unit_bytes)
        return [(a, b, 'train') for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    if fmt.kind == 'jsonl':
        doc_separator = 'line'  # a record is a line
    cuts = [0]
    with formats.open_binary(source) as f:
        nominal = unit_bytes
        while nominal < size:
            cut = _next_boundary(f, nominal, size, doc_separator)
            if cut >= size:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
            nominal = max(cut, nominal) + unit_bytes
    cuts.append(size)
    return [(a, b, 'train') for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _line_blocks(path: str, start: int, end: int, bad: BadInput,
                 policy: str) -> Iterator[tuple[list[str], int]]:
    """(stripped lines, bytes read) per block of [start, end); invalid UTF-8 lines come
    out empty (skipped as documents) and are counted in `bad`."""
    with formats.open_binary(path) as f:
        f.seek(start)
        position, carry = start, b''
        while position < end:
            block = f.read(min(_READ_BLOCK, end - position))
            if not block:
                break
            position += len(block)
            data = carry + block
            if position < end:
                cut = data.rfind(b'\n') + 1
                data, carry = data[:cut], data[cut:]
            else:
                carry = b''
            offset = position - len(carry) - len(data)
            yield _decode_block(data, path, offset, bad, policy), len(block)


def _decode_block(data: bytes, path: str, offset: int, bad: BadInput, policy: str) -> list[str]:
    try:  # whole-block decoding is the fast path; per line only to find bad lines
        lines = data.decode('utf-8').split('\n')
    except UnicodeDecodeError:
        lines = []
        for raw in data.split(b'\n'):
            try:
                lines.append(raw.decode('utf-8'))
            except UnicodeDecodeError:
                if policy == 'error':
                    raise BadLine(path, offset) from None
                bad.add_line(path, offset)
                lines.append('')
            offset += len(raw) + 1
    if lines and lines[-1] == '':
        lines.pop()  # after the last '\n'
    return [line.strip() for line in lines]


class BadLine(formats.BadRecord):
    """A line that is not UTF-8 under data.bad_input='error' (path, byte offset); its line
    number is counted only when the message is shown."""

    def __init__(self, path: str, offset: int):
        Exception.__init__(self, path, offset)
        self.path, self.offset = path, offset

    def message(self, key: str) -> str:
        return (f'{key}: {self.path}:{line_number(self.path, self.offset)} is not valid UTF-8 '
                "(data.bad_input=error; set it to 'skip' to drop such lines)")


def unit_document_batches(unit: Unit, doc_separator: str, bad: BadInput, policy: str,
                          text_field: str = 'text') -> Iterator[tuple[list[str], int]]:
    """(documents, input bytes they came from) of a unit, a block at a time; empty
    documents are left out. JSONL and Parquet documents are `text_field` of each record."""
    if unit.is_tfds:
        yield from _tfds_documents(unit)
        return
    for path, start, end in unit.ranges():  # a paragraph never spans two files
        fmt = formats.file_format(path)
        if fmt.kind == 'parquet':
            yield from formats.parquet_batches(path, start, end, text_field, bad, policy)
        elif fmt.kind == 'jsonl':
            yield from formats.jsonl_batches(path, fmt, start, end, text_field, bad, policy,
                                             lambda p=path, s=start: line_number(p, s))
        else:
            yield from _range_document_batches(path, start, end, doc_separator, bad, policy)


def _stripped_blocks(path: str, start: int, end: int, bad: BadInput,
                     policy: str) -> Iterator[tuple[list[str], int]]:
    """_line_blocks of a plain text file; a compressed one's stripped lines."""
    fmt = formats.file_format(path)
    if fmt.plain:
        yield from _line_blocks(path, start, end, bad, policy)
        return
    for _, lines, size in formats.line_blocks(path, fmt, start, end, bad, policy, lambda: 1):
        yield [line.strip() for line in lines], size


def _range_document_batches(path: str, start: int, end: int, doc_separator: str,
                            bad: BadInput, policy: str) -> Iterator[tuple[list[str], int]]:
    paragraph: list[str] = []
    for lines, size in _stripped_blocks(path, start, end, bad, policy):
        if doc_separator == 'line':
            yield [line for line in lines if line], size
            continue
        docs = []
        for line in lines:
            if line:
                paragraph.append(line)
            elif paragraph:
                docs.append(' '.join(paragraph))
                paragraph = []
        yield docs, size
    if paragraph:
        yield [' '.join(paragraph)], 0


def unit_documents(unit: Unit, doc_separator: str, bad: BadInput, policy: str,
                   text_field: str = 'text') -> Iterator[str]:
    """The documents of a unit, one at a time."""
    for docs, _ in unit_document_batches(unit, doc_separator, bad, policy, text_field):
        yield from docs


def _tfds_documents(unit: Unit) -> Iterator[tuple[list[str], int]]:
    name, feature = parse_indexed_spec(unit.source)
    key = 'data.train_files' if unit.role == 'train' else 'data.eval_files'
    source = open_indexed_split(unit.source, unit.split, key)
    for start in range(unit.start, unit.end, READ_BATCH):
        docs = []
        for example in source.__getitems__(range(start, min(start + READ_BATCH, unit.end))):
            if feature not in example:
                raise ConfigError(f'{key}: dataset {name!r} has no feature {feature!r}; '
                                  f'it has {sorted(example)}')
            text = as_text(example[feature]).strip()
            if text:
                docs.append(text)
        yield docs, sum(len(d) for d in docs)


def iter_texts(sources: Sequence[str], doc_separator: str = 'line', split: str = 'train',
               key: str = 'data.train_files', text_field: str = 'text') -> Iterator[str]:
    """All documents of text files and 'tfds:NAME[:feature]' specs (their `split`), in
    order, invalid UTF-8 lines left out: for small inputs read whole."""
    if doc_separator not in DOC_SEPARATORS:
        raise ConfigError(f'data.doc_separator: must be one of {DOC_SEPARATORS}, '
                          f'got {doc_separator!r}')
    bad = BadInput()
    for source in sources:
        if is_indexed(source):
            unit = Unit(0, source, 0, len(open_indexed_split(source, split, key)), 'train',
                        split)
        else:
            unit = Unit(0, source, 0, formats.file_size(source), 'train')
        yield from unit_documents(unit, doc_separator, bad, 'skip', text_field)
