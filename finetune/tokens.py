"""Token classification data: words with one label each, read, checked and encoded.

Files: CoNLL-style text (one `word ... label` per line, the first field the word and the
last its label, so CoNLL-2003's four columns read too; a blank line between sentences;
`-DOCSTART-` lines skipped) or JSONL (`{"tokens": [...], "labels": [...]}` a line).
Any other extension is read as CoNLL.

Encoding labels the first subword of each word (the other subwords, [CLS], [SEP] and
padding get IGNORE, out of the loss and the metrics), as BERT's NER recipe does; words
past seq_len are cut, and predicted 'O' (counted as such by the metrics).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np

from finetune import data
from text.tokenizer import CLS_ID, PAD_ID, SEP_ID, UNK_ID

IGNORE = -1  # a label id outside every class: the position is not scored
OUTSIDE = 'O'
DOCSTART = '-DOCSTART-'

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenExamples:
    """One split: sentences as word lists, their tags (None when unlabelled), and the
    file line each sentence starts on (for errors)."""

    words: list[list[str]]
    tags: list[list[str]] | None
    lines: list[int]

    def __len__(self) -> int:
        return len(self.words)

    @property
    def text_a(self) -> list[str]:  # a from-scratch run trains its tokenizer on these
        return [' '.join(w) for w in self.words]

    text_b = None


def _conll_sentences(path: str, text: str, labelled: bool) -> list[dict]:
    rows, words, tags, start = [], [], [], 0
    for line, raw in enumerate(text.split('\n'), start=1):
        fields = raw.split()
        if fields and fields[0] == DOCSTART:
            continue
        if not fields:
            if words:
                rows.append({'words': words, 'tags': tags, 'line': start, 'label': None})
            words, tags = [], []
            continue
        if labelled and len(fields) < 2:
            raise data.error(path, line, f'expected "word label", got {data.show(raw)}')
        if not words:
            start = line
        words.append(fields[0])
        tags.append(fields[-1] if labelled else None)
    if words:
        rows.append({'words': words, 'tags': tags, 'line': start, 'label': None})
    return rows


def _word_list(path: str, line: int, row: dict, key: str) -> list[str]:
    value = row.get(key)
    if not isinstance(value, list) or not all(isinstance(w, str) and w.strip()
                                              for w in value):
        raise data.error(path, line, f'{key!r}: expected a list of non-empty strings, got '
                                     f'{data.show(value)}')
    return [w.strip() for w in value]


def _jsonl_sentences(path: str, text: str, labelled: bool) -> list[dict]:
    rows = []
    for line, row in data.jsonl_values(path, text):
        if not isinstance(row, dict):
            raise data.error(path, line, f'expected a JSON object, got {type(row).__name__}')
        words = _word_list(path, line, row, 'tokens')
        tags = _word_list(path, line, row, 'labels') if labelled else [None] * len(words)
        if len(tags) != len(words):
            raise data.error(path, line, f'{len(words)} tokens but {len(tags)} labels')
        if words:
            rows.append({'words': words, 'tags': tags, 'line': line, 'label': None})
    return rows


def read_sentences(path: str, labelled: bool = True) -> list[dict]:
    """Sentences of a CoNLL or .jsonl file: [{'words', 'tags', 'line'}], in file order.
    Raises a one-line ValueError naming the file and line of a bad one."""
    path = str(path)
    text = data.read_text(path)
    jsonl = os.path.splitext(path)[1].lower() in ('.jsonl', '.json')
    rows = (_jsonl_sentences if jsonl else _conll_sentences)(path, text, labelled)
    if not rows:
        raise data.error(path, None, 'no sentences in the file')
    return rows


def _examples(rows: Sequence[dict], path: str, label_names: list[str]) -> TokenExamples:
    known = set(label_names)
    for r in rows:
        for tag in r['tags']:
            if tag not in known:
                raise data.error(path, r['line'], f'label {data.show(tag)} (in the sentence '
                                                  f'from this line) is not one of the '
                                                  f'training labels {label_names}')
    return TokenExamples([r['words'] for r in rows], [r['tags'] for r in rows],
                         [r['line'] for r in rows])


def load_task(train_file: str, validation_file: str = '', test_file: str = '', *,
              validation_fraction: float = 0.1, seed: int = 0,
              max_train_examples: int = 0) -> dict:
    """{'train', 'validation', 'test' (None without a file), 'label_names'}: the sorted tags
    of the training file (with 'O' first when present), before any validation rows are
    held out of it or max_train_examples subsamples it."""
    if not train_file:
        raise ValueError('train_file: empty')
    splits = {split: (path, read_sentences(path)) if path else None
              for split, path in zip(('train', 'validation', 'test'),
                                     (train_file, validation_file, test_file), strict=True)}
    # The whole training file's tags: a held-out or subsampled-away tag is still a class.
    tags = {t for r in splits['train'][1] for t in r['tags']}
    if splits['validation'] is None:
        train, held = data.carve_validation(splits['train'][1], validation_fraction, seed)
        splits['train'], splits['validation'] = (train_file, train), (train_file, held)
    if max_train_examples:
        splits['train'] = (train_file, data.subsample(splits['train'][1],
                                                      max_train_examples, seed))
    names = sorted(tags, key=lambda t: (t != OUTSIDE, t))
    out: dict = {'label_names': names}
    for split, found in splits.items():
        out[split] = None if found is None else _examples(found[1], found[0], names)
    return out


def encode(tokenizer, examples: TokenExamples, seq_len: int,
           label_names: Sequence[str]) -> dict[str, np.ndarray]:
    """int32 (N, seq_len) 'input_ids', 'token_type_ids', 'attention_mask' and 'labels' (the
    word's label id on its first subword, IGNORE elsewhere; 0 on every first subword of
    unlabelled examples, so that `labels >= 0` marks the words either way)."""
    if seq_len < 3:
        raise ValueError(f'seq_len: {seq_len} leaves no room for text')
    flat = [w for words in examples.words for w in words]
    pieces = tokenizer.encode_batch(flat)
    ids = {name: i for i, name in enumerate(label_names)}
    n = len(examples)
    out = np.full((n, seq_len), PAD_ID, np.int32)
    labels = np.full((n, seq_len), IGNORE, np.int32)
    lengths = np.zeros(n, np.int64)
    cut, k = 0, 0
    for row, words in enumerate(examples.words):
        tokens, firsts = [CLS_ID], []
        for j in range(len(words)):
            word = pieces[k + j] or [UNK_ID]  # a word spm drops entirely still gets a slot
            if len(tokens) + len(word) > seq_len - 1:
                cut += len(words) - j
                break
            firsts.append(len(tokens))
            tokens += word
        tokens.append(SEP_ID)
        out[row, :len(tokens)] = tokens
        tags = examples.tags[row] if examples.tags is not None else None
        labels[row, firsts] = [ids[tags[j]] for j in range(len(firsts))] if tags else 0
        lengths[row] = len(tokens)
        k += len(words)
    if cut:
        log.warning('encode: %d of %d words are past seq_len %d (predicted %r)', cut,
                    len(flat), seq_len, OUTSIDE)
    mask = (np.arange(seq_len) < lengths[:, None]).astype(np.int32)
    return {'input_ids': out, 'token_type_ids': np.zeros_like(out), 'attention_mask': mask,
            'labels': labels}


def word_predictions(label_ids: np.ndarray, encoded_labels: np.ndarray,
                     examples: TokenExamples, label_names: Sequence[str]) -> list[list[str]]:
    """Per-word tags from per-token predicted ids (N, L') read at the first subwords
    (`encoded_labels >= 0`); words cut by seq_len are 'O'."""
    out = []
    width = label_ids.shape[1]
    for row, words in enumerate(examples.words):
        cols = np.flatnonzero(encoded_labels[row, :width] >= 0)
        tags = [label_names[int(i)] for i in label_ids[row, cols]]
        out.append(tags + [OUTSIDE] * (len(words) - len(tags)))
    return out
