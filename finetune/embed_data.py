"""The data of an embedding run (task=embedding): (anchor, positive) pairs per split.

data.train_file (and validation_file / test_file) is one of
  - a .csv/.tsv/.jsonl file of pairs: columns data.text_column (the anchor, e.g. 'anchor')
    and data.text_b_column (its positive, e.g. 'positive'); with text_b_column='' the
    positive is the anchor itself (unsupervised SimCSE: two dropout masks of one sentence);
  - a .txt file, one sentence a line (SimCSE; blank lines are separators);
  - 'wikitext-sections': WikiText-2's (title: section heading, first paragraph) pairs
    (text/wiki_pairs.py), its own train / validation / test articles.
A row with an empty anchor or positive is skipped, with one warning line counting them.
Without a validation file a seeded validation_fraction of the training pairs is held out.
The task's Examples hold anchors in text_a, positives in text_b, labels = row numbers.
"""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np
from etils import epath

from finetune import data
from text import wiki_pairs

log = logging.getLogger(__name__)


def _pairs_examples(pairs: list[tuple[str, str]]) -> data.Examples:
    return data.Examples(text_a=[a for a, _ in pairs], text_b=[b for _, b in pairs],
                         labels=np.arange(len(pairs), dtype=np.int32))


def _text_lines(path: str) -> list[tuple[str, str]]:
    try:
        text = epath.Path(path).read_text(encoding='utf-8-sig')
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f'{path}: cannot read as UTF-8 text ({e})') from None
    lines = [' '.join(line.split()) for line in text.splitlines()]
    pairs = [(line, line) for line in lines if line]
    if not pairs:
        raise ValueError(f'{path}: no text (empty or blank lines only)')
    return pairs


def read_pairs(path: str, anchor_column: str, positive_column: str) -> list[tuple[str, str]]:
    """(anchor, positive) rows of a pairs file, or (sentence, sentence) of a text file."""
    if os.path.splitext(path)[1].lower() == '.txt':
        return _text_lines(path)
    rows = data.read_examples(path, text_column=anchor_column, text_b_column=positive_column,
                              label_column='', skip_empty=True)
    return [(r['text_a'], r['text_b'] if positive_column else r['text_a']) for r in rows]


def load_embedding_task(cfg: ml_collections.ConfigDict) -> dict:
    """{'train', 'validation', 'test' (None without), 'label_names': None} of pairs."""
    d = cfg.data
    if not d.train_file:
        raise ValueError('train_file: empty')
    if d.train_file == wiki_pairs.NAME:
        if d.validation_file or d.test_file:
            raise ValueError(f'train_file={wiki_pairs.NAME!r} has its own validation and test '
                             'splits; leave validation_file and test_file empty')
        splits = {s: wiki_pairs.wikitext_pairs(s) for s in ('train', 'validation', 'test')}
    else:
        columns = (d.text_column, d.text_b_column)
        splits = {split: read_pairs(path, *columns) if path else None
                  for split, path in (('train', d.train_file),
                                      ('validation', d.validation_file),
                                      ('test', d.test_file))}
    if splits['validation'] is None:
        rows = [{'pair': p, 'label': None} for p in splits['train']]
        train, held = data.carve_validation(rows, d.validation_fraction, cfg.seed)
        splits['train'], splits['validation'] = [r['pair'] for r in train], [r['pair'] for r
                                                                            in held]
    if d.max_train_examples:
        splits['train'] = data.subsample(splits['train'], d.max_train_examples, cfg.seed)
    if len(splits['train']) < 2:
        raise ValueError(f'train_file: {len(splits["train"])} pair(s); in-batch negatives '
                         'need at least 2')
    if all(a == b for a, b in splits['validation']):
        log.warning('validation: every positive is its anchor (plain text): retrieval '
                    'there is trivial; give a pairs validation_file to choose checkpoints')
    return {'label_names': None,
            **{s: None if p is None else _pairs_examples(p) for s, p in splits.items()}}
