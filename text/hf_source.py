"""Hugging Face `datasets` as input: 'hf:PATH_OR_NAME[:split][:column]'.

PATH_OR_NAME is a `save_to_disk` directory (a Dataset or a DatasetDict) or the name of a
dataset already in the local hub cache; nothing is downloaded at run time (the library's
offline mode is switched on before it is imported). `split` picks the split (default: the
role's, 'train' for training text and 'validation' for held-out text; a directory holding
one Dataset is its only split, 'train'); `column` the text column for pretraining (default
'text'). Fine-tuning names its columns by keys (data.text_column, data.label_column).

A split opens as an `IndexedSplit`: `len`, `__getitems__(range)` -> rows as dicts, and a
`dataset_info` with `version` (a fingerprint of the Arrow files, so a changed dataset is
prepared again), `splits` and `features` (a ClassLabel's `names` give the class order), the
interface the TFDS path reads, so both go through the same preparation units.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence

from engine import extras

HF_PREFIX = 'hf:'
DEFAULT_COLUMN = 'text'


@dataclasses.dataclass(frozen=True)
class Spec:
    path: str
    split: str  # '' = the role's default
    column: str


def parse_spec(spec: str) -> Spec:
    """'hf:PATH[:split][:column]' -> Spec (column default 'text')."""
    rest = spec[len(HF_PREFIX):]
    path, _, tail = rest.partition(':')
    split, _, column = tail.partition(':')
    if not path:
        raise ValueError(f'{spec!r}: give a dataset, hf:PATH_OR_NAME[:split][:column]')
    return Spec(path, split, column or DEFAULT_COLUMN)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    version: str
    splits: tuple[str, ...]
    features: dict


class IndexedSplit:
    """One split of a `datasets` dataset, read by index."""

    def __init__(self, dataset, splits: Sequence[str]):
        self.dataset = dataset
        self.dataset_info = DatasetInfo(_fingerprint(dataset), tuple(splits),
                                        dict(dataset.features))

    def __len__(self) -> int:
        return self.dataset.num_rows

    def __getitems__(self, indices: range) -> list[dict]:
        if not len(indices):
            return []
        columns = self.dataset[indices.start:indices.stop]  # one Arrow slice: {column: values}
        names = list(columns)
        return [dict(zip(names, values, strict=True))
                for values in zip(*(columns[n] for n in names), strict=True)]


def _fingerprint(dataset) -> str:
    """The Arrow files' names, sizes and mtimes (in-memory data: its row count)."""
    parts = []
    for cache in dataset.cache_files:
        st = os.stat(cache['filename'])
        parts.append(f'{os.path.abspath(cache["filename"])}:{st.st_size}:{st.st_mtime_ns}')
    parts.append(f'rows={dataset.num_rows}')
    return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:16]


def open_split(spec: str, split: str, key: str) -> IndexedSplit:
    """The split of `spec` (its own split if it names one, else `split`), or a one-line
    ValueError naming what exists."""
    parsed = parse_spec(spec)
    wanted = parsed.split or split
    splits = _load(parsed.path, key)
    if wanted not in splits:
        raise ValueError(f'{key}: Hugging Face dataset {parsed.path!r} has no split '
                         f'{wanted!r}; its splits are {sorted(splits)}')
    return IndexedSplit(splits[wanted], list(splits))


@functools.lru_cache(maxsize=16)
def _load(path: str, key: str) -> dict:
    """{split: Dataset} of a save_to_disk directory or a cached hub dataset."""
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # read before `datasets` is imported
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    datasets = extras.require('datasets', f'{key}=hf:{path} (a Hugging Face dataset)')
    expanded = os.path.expanduser(path)
    try:
        if os.path.isdir(expanded):
            loaded = datasets.load_from_disk(expanded)
        else:
            loaded = datasets.load_dataset(path)
    except Exception as e:  # not found, not cached, not a dataset directory: many types
        first = (str(e).splitlines() or [''])[0][:200]
        raise ValueError(f'{key}: cannot open Hugging Face dataset {path!r}: neither a '
                         'save_to_disk directory nor a dataset in the local hub cache '
                         f'(no download at run time; {type(e).__name__}: {first})') from None
    if isinstance(loaded, datasets.Dataset):
        return {'train': loaded}
    return dict(loaded)
