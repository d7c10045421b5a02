"""Fine-tuning examples -> encoded arrays -> batches.

Batches: TaskBatches is text.batches.PretrainBatches over the encoded rows; eval_batches
adds a `weights` column so the last batch's padding rows count for nothing. With dynamic
padding (data.dynamic_padding, on by default) a batch is cut to the longest row of its
*global* batch, rounded up to a power of two from MIN_BUCKET (capped at seq_len): every
process gets the same shape, and at most log2(seq_len / MIN_BUCKET) + 1 shapes compile.
The cut columns are padding in every row, masked everywhere, so only the work changes (and
dropout's random masks, which are drawn for the shorter shape).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import numpy as np

from finetune.data import Examples
from text import batches as text_batches
from text.records import ArraySequences
from text.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer

log = logging.getLogger(__name__)


def _flatten(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                       count=int(lengths.sum()))
    return flat, lengths


def truncated_lengths(len_a: np.ndarray, len_b: np.ndarray | None, budget: int
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """Tokens kept of each text so the total fits `budget`, longest-first.

    As BERT's _truncate_seq_pair (drop the last token of the longer text, of b on a
    tie) in closed form: trim the longer text alone while that suffices, else both
    get half the budget (a the odd token).
    """
    if len_b is None:
        return np.minimum(len_a, budget), None
    excess = len_a + len_b - budget
    alone = np.maximum(len_a, len_b) - excess >= np.minimum(len_a, len_b)
    keep_a = np.where(alone, np.where(len_a > len_b, len_a - excess, len_a), (budget + 1) // 2)
    keep_b = np.where(alone, np.where(len_a > len_b, len_b, len_b - excess), budget // 2)
    fits = excess <= 0
    return np.where(fits, len_a, keep_a), np.where(fits, len_b, keep_b)


def _place(out: np.ndarray, ids: list[list[int]], keep: np.ndarray, first_col: np.ndarray
           ) -> None:
    """Writes the first keep[i] tokens of row i from column first_col[i] on."""
    flat, lengths = _flatten(ids)
    row = np.repeat(np.arange(len(ids)), lengths)
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    kept = pos < keep[row]
    out[row[kept], first_col[row[kept]] + pos[kept]] = flat[kept]


def encode(tokenizer: Tokenizer, examples: Examples, seq_len: int) -> dict[str, np.ndarray]:
    """int32 (N, seq_len) 'input_ids', 'token_type_ids', 'attention_mask', and 'labels'.

    [CLS] a [SEP], or [CLS] a [SEP] b [SEP] with token type 1 from b to its [SEP];
    longest-first truncation to fit, [PAD] after. A tokenizer whose pair_template is
    'roberta' joins pairs as [CLS] a [SEP] [SEP] b [SEP], all token type 0.
    """
    paired = examples.text_b is not None
    roberta = paired and getattr(tokenizer, 'pair_template', 'bert') == 'roberta'
    gap = 2 if roberta else 1  # [SEP]s between a and b
    budget = seq_len - (2 + gap if paired else 2)
    if budget < (2 if paired else 1):
        raise ValueError(f'seq_len: {seq_len} leaves no room for text')
    n = len(examples)
    ids_a = tokenizer.encode_batch(examples.text_a)
    ids_b = tokenizer.encode_batch(examples.text_b) if paired else None
    len_a = _flatten(ids_a)[1]
    len_b = _flatten(ids_b)[1] if paired else None
    keep_a, keep_b = truncated_lengths(len_a, len_b, budget)
    out = np.full((n, seq_len), PAD_ID, dtype=np.int32)
    out[:, 0] = CLS_ID
    _place(out, ids_a, keep_a, np.ones(n, dtype=np.int64))
    out[np.arange(n), keep_a + 1] = SEP_ID
    length = keep_a + 2
    if paired:
        if roberta:
            out[np.arange(n), length] = SEP_ID
        _place(out, ids_b, keep_b, keep_a + 1 + gap)
        length = length + gap - 1 + keep_b + 1
        out[np.arange(n), length - 1] = SEP_ID
    cols = np.arange(seq_len)
    mask = cols < length[:, None]
    types = (mask & (cols >= (keep_a + 2)[:, None]) if paired and not roberta
             else np.zeros_like(mask))
    truncated = int(np.sum(keep_a < len_a) + (np.sum(keep_b < len_b) if paired else 0))
    if truncated:
        log.info('encode: truncated %d of %d examples to seq_len %d', truncated, n, seq_len)
    return {'input_ids': out, 'token_type_ids': types.astype(np.int32),
            'attention_mask': mask.astype(np.int32), 'labels': examples.labels.copy()}


# ---------------------------------------------------------------- batches


def _check_encoded(encoded: dict[str, np.ndarray]) -> int:
    n = len(ArraySequences(encoded))
    if n == 0:
        raise ValueError('encoded: no examples')
    return n


MIN_BUCKET = 16
SEQUENCE_KEYS = ('input_ids', 'token_type_ids', 'attention_mask')


def bucket_length(longest: int, seq_len: int) -> int:
    """The padded length of a batch whose longest row has `longest` tokens: the smallest
    power of two >= max(longest, MIN_BUCKET), at most seq_len."""
    length = MIN_BUCKET
    while length < longest:
        length *= 2
    return min(length, seq_len)


def cut_padding(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """The batch with its sequence columns cut to `length` (other keys as they are)."""
    return {k: v[:, :length] if k in SEQUENCE_KEYS else v for k, v in batch.items()}


def row_lengths(encoded: dict[str, np.ndarray]) -> np.ndarray:
    """Tokens of each encoded row (its attention mask's sum)."""
    return encoded['attention_mask'].sum(axis=1)


class TaskBatches(text_batches.PretrainBatches):
    """Training batches as a pure function of (seed, step), as PretrainBatches.

    Epoch e is a seeded permutation of the examples; an epoch's last incomplete batch
    borrows from the next, so every batch has global_batch_size rows. This process
    gets rows [i*B/P, (i+1)*B/P) of each global batch. batch(step), iterate(start_step).
    With `dynamic_padding` a batch is cut to its global batch's bucket length.
    """

    def __init__(self, encoded: dict[str, np.ndarray], global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, *,
                 dynamic_padding: bool = True):
        _check_encoded(encoded)
        super().__init__(encoded, global_batch_size, seed, process_index, process_count)
        self.seq_len = encoded['input_ids'].shape[1]
        self._lengths = row_lengths(encoded) if dynamic_padding else None

    @property
    def num_examples(self) -> int:
        return self.num_chunks

    def length(self, step: int) -> int:
        """The sequence length of step's batch (the same on every process)."""
        if self._lengths is None:
            return self.seq_len
        longest = max(int(self._lengths[row]) for _, row in self.global_rows(step))
        return bucket_length(longest, self.seq_len)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        batch = super().batch(step)
        return batch if self._lengths is None else cut_padding(batch, self.length(step))


def eval_batches(encoded: dict[str, np.ndarray], batch_size: int, process_index: int = 0,
                 process_count: int = 1, *, dynamic_padding: bool = True
                 ) -> Iterator[dict[str, np.ndarray]]:
    """All examples in order, batch_size at a time (this process's rows of each).

    The last batch is padded to batch_size with [PAD] rows; 'weights' (float32) is 1 on
    real rows and 0 on padding, so metrics and losses can ignore the filler. With
    `dynamic_padding` each batch is cut to its (global) rows' bucket length.
    """
    n = len(ArraySequences(encoded))
    with_weights = {**encoded, 'weights': np.ones(n, dtype=np.float32)}
    lengths, seq_len = row_lengths(encoded), encoded['input_ids'].shape[1]
    batches = text_batches.eval_batches(with_weights, batch_size, process_index, process_count)
    for i, batch in enumerate(batches):
        if dynamic_padding:
            longest = int(lengths[i * batch_size:(i + 1) * batch_size].max())
            batch = cut_padding(batch, bucket_length(longest, seq_len))
        yield batch
