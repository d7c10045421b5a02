"""Packing documents into fixed-length sequences, as a stream or all at once.

The documents, each followed by [SEP], form one stream cut into windows of seq_len - 1
tokens; each window gets a [CLS] in front and the last one is padded with [PAD].
segment_ids number the document pieces inside each sequence 1, 2, 3... ([CLS] belongs
to the first), 0 on padding, so attention can keep documents apart.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from text.tokenizer import CLS_ID, PAD_ID, SEP_ID


class Packer:
    """Packs documents as they come, holding less than one sequence of tokens.

    `add(docs)` takes a batch of documents and returns the sequences they complete,
    `finish()` the padded rest. Any split of the same documents into batches gives
    exactly `pack_documents`' rows. Work is vectorized per batch (no per-document loop).
    """

    def __init__(self, seq_len: int):
        if seq_len < 2:
            raise ValueError(f'seq_len: must be at least 2, got {seq_len}')
        self.seq_len = seq_len
        self._width = seq_len - 1
        self._tokens = np.zeros(0, dtype=np.int32)  # the unfinished window's tokens
        self._docs = np.zeros(0, dtype=np.int64)  # their document numbers
        self._next_doc = 0
        self.tokens = 0  # document tokens added so far ([SEP] not counted)

    def add(self, docs: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Appends documents (token id sequences; [SEP] added here); returns the completed
        (input_ids, segment_ids), each int32 of shape (n, seq_len)."""
        lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        total = int(lengths.sum())
        self.tokens += total - len(docs)
        stream = np.empty(total, dtype=np.int32)
        ends = np.cumsum(lengths)
        is_token = np.ones(total, dtype=bool)
        is_token[ends - 1] = False
        stream[is_token] = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32,
                                       count=total - len(docs))
        stream[ends - 1] = SEP_ID
        numbers = np.repeat(np.arange(self._next_doc, self._next_doc + len(docs)), lengths)
        self._next_doc += len(docs)
        tokens = np.concatenate([self._tokens, stream])
        numbers = np.concatenate([self._docs, numbers])
        full = len(tokens) // self._width * self._width
        self._tokens, self._docs = tokens[full:], numbers[full:]
        return self._rows(tokens[:full], numbers[:full])

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """The last, padded sequence (none if the stream ended on a window boundary)."""
        pad = -len(self._tokens) % self._width
        tokens = np.concatenate([self._tokens, np.full(pad, PAD_ID, np.int32)])
        numbers = np.concatenate([self._docs, np.full(pad, -1, np.int64)])
        self._tokens, self._docs = tokens[:0], numbers[:0]
        return self._rows(tokens, numbers)

    def _rows(self, tokens: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(tokens) // self._width
        tokens, numbers = tokens.reshape(n, self._width), numbers.reshape(n, self._width)
        # Documents only grow along the stream: a piece's number is its document's offset
        # from the window's first document, plus one; padding is 0.
        segments = np.where(numbers >= 0, numbers - numbers[:, :1] + 1, 0).astype(np.int32)
        input_ids = np.concatenate([np.full((n, 1), CLS_ID, np.int32), tokens], axis=1)
        return input_ids, np.concatenate([np.ones((n, 1), np.int32), segments], axis=1)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items (the last may be shorter)."""
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def iter_packed(docs: Iterable, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, segment_ids) of each packed sequence, in order."""
    packer = Packer(seq_len)
    for batch in batched(docs, 1024):
        yield from zip(*packer.add(batch), strict=True)
    yield from zip(*packer.finish(), strict=True)


def pack_documents(docs: Iterable, seq_len: int) -> dict[str, np.ndarray]:
    """All documents packed: int32 'input_ids' and 'segment_ids' of shape (n, seq_len)."""
    packer = Packer(seq_len)
    parts = [packer.add(batch) for batch in batched(docs, 1024)] + [packer.finish()]
    return {'input_ids': np.concatenate([p[0] for p in parts]),
            'segment_ids': np.concatenate([p[1] for p in parts])}


def padding_fraction(chunks: dict[str, np.ndarray]) -> float:
    """Share of [PAD] positions in packed sequences."""
    ids = chunks['input_ids']
    return float((ids == PAD_ID).mean()) if ids.size else 0.0
