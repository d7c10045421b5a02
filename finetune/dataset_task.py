"""A dataset read by index as a fine-tuning task: which splits, and their rows.

A locally prepared TFDS dataset ('tfds:NAME') or a Hugging Face dataset ('hf:PATH_OR_NAME',
a save_to_disk directory or the local hub cache: text/hf_source.py). finetune.data.load_task
with such a train_file reads its 'train' split (an 'hf:PATH:SPLIT' spec: that split), and
for validation and test the split that data.validation_file / data.test_file name:

  ''         the dataset's own 'validation' / 'test' split where it has one (else: the
             validation set is carved from train, and there is no test set)
  'none'     no such split (validation: carved from train)
  SPLIT      that split, e.g. 'validation_matched' of glue/mnli; a one-line ValueError
             names the dataset's splits when it has no such split

GLUE's test splits are unlabelled (label -1), so a GLUE task evaluates on its validation
split(s) as the test set (configs/suite.py:glue, docs/glue.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from text import corpus, hf_source

ROLES = ('validation', 'test')  # the splits whose source a config may choose
NONE = 'none'


def dataset_name(spec: str) -> str:
    return corpus.parse_indexed_spec(spec)[0]


def _prefix(spec: str) -> str:
    return spec.split(':', 1)[0]


def train_split(spec: str) -> str:
    """'train', or the split an 'hf:PATH:SPLIT' spec names."""
    if spec.startswith(hf_source.HF_PREFIX):
        return hf_source.parse_spec(spec).split or 'train'
    return 'train'


def _splits(spec: str) -> list[str]:
    # The train split is required: opening it reports a missing or unprepared dataset.
    info = corpus.open_indexed_split(spec, train_split(spec), 'train_file').dataset_info
    return list(info.splits)


def _open(spec: str, split: str):
    """Split `split` of the dataset (an hf: spec's own split applies to train only)."""
    if spec.startswith(hf_source.HF_PREFIX):
        spec = f'{hf_source.HF_PREFIX}{hf_source.parse_spec(spec).path}'
    return corpus.open_indexed_split(spec, split, 'train_file')


def choose_splits(spec: str, validation: str, test: str) -> dict[str, str | None]:
    """{'train': 'train', 'validation': SPLIT or None, 'test': SPLIT or None} of the TFDS
    dataset `spec`, from the validation_file and test_file values (module docstring)."""
    have = _splits(spec)
    chosen: dict[str, str | None] = {'train': train_split(spec)}
    for role, given in zip(ROLES, (validation, test), strict=True):
        if not given:
            chosen[role] = role if role in have else None
        elif given.lower() == NONE:
            chosen[role] = None
        elif given in have:
            chosen[role] = given
        else:
            kind = 'Hugging Face' if spec.startswith(hf_source.HF_PREFIX) else 'TFDS'
            raise ValueError(f'{role}_file: {kind} dataset {dataset_name(spec)!r} has no split '
                             f'{given!r}; its splits are {sorted(have)} (or {NONE!r})')
    return chosen


def read_rows(spec: str, split: str, columns: Sequence[str], label_column: str,
              task: str) -> tuple[str, list[tuple[int, dict]]]:
    """(name for errors, [(row index, {column: value})]) of a dataset split.

    A ClassLabel feature gives its label names; its -1 (an unlabelled example, as in
    GLUE's test splits) becomes a missing label (None).
    """
    source = _open(spec, split)
    where = f'{_prefix(spec)}:{dataset_name(spec)}[{split}]'
    features = source.dataset_info.features
    for col in columns:
        if col not in features:
            raise ValueError(f'{where}: no feature {col!r}; the features are '
                             f'{sorted(features)}')
    names = getattr(features[label_column], 'names', None) if task == 'classification' else None
    rows = []
    for start in range(0, len(source), corpus.READ_BATCH):
        batch = source.__getitems__(range(start, min(start + corpus.READ_BATCH, len(source))))
        for i, example in enumerate(batch, start=start):
            row = {c: corpus.as_text(example[c]) for c in columns if c != label_column}
            label = example[label_column]
            if names is not None:
                label = names[int(label)] if 0 <= int(label) < len(names) else None
            row[label_column] = label
            rows.append((i, row))
    return where, rows


def class_names(spec: str, label_column: str) -> list[str] | None:
    """A ClassLabel's names in id order (e.g. MNLI's entailment, neutral, contradiction)."""
    features = _open(spec, train_split(spec)).dataset_info.features
    if label_column not in features:
        return None  # read_rows names the missing column
    names = getattr(features[label_column], 'names', None)
    return list(names) if names else None
