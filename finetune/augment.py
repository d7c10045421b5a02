"""Fine-tuning data regularisers: token-level augmentation and few-shot subsets.

Augmentation (config `augment.delete`, `augment.swap`, `augment.mask`: per-token
probabilities, 0 = off) edits each training batch's token ids, a pure function of
(seed, step, process): resumed runs see the same batches. Only text tokens change; [CLS],
[SEP] and [PAD] stay put, and a swap stays within its segment (text A or text B).
  delete  drops the token; the row closes up and is padded at the end (token types follow)
  swap    exchanges the token with another random token of its segment (EDA-style)
  mask    replaces the token with the model's own [MASK] (id 4), as in pretraining

Few-shot (`data.few_shot_k` > 0): K training examples per class, drawn with the run's seed
(all of a class when it has fewer); validation and test stay whole.
"""

import numpy as np

from finetune import data, encoding
from text.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID

_SPECIAL = (PAD_ID, CLS_ID, SEP_ID)


def check_probabilities(delete: float, swap: float, mask: float) -> None:
    for name, p in (('delete', delete), ('swap', swap), ('mask', mask)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f'augment.{name}: must be in [0, 1), got {p}')


def _augment_row(ids, types, rng, delete: float, swap: float, mask: float):
    text = ~np.isin(ids, _SPECIAL)
    if swap:
        for segment in np.unique(types[text]):
            where = np.flatnonzero(text & (types == segment))
            for i in where[rng.random(where.size) < swap]:
                j = rng.choice(where)
                ids[i], ids[j] = ids[j], ids[i]
    if mask:
        ids[text & (rng.random(ids.size) < mask)] = MASK_ID
    if delete:
        keep = ~(text & (rng.random(ids.size) < delete))
        n = int(keep.sum())
        ids[:n], types[:n] = ids[keep], types[keep]
        ids[n:], types[n:] = PAD_ID, 0
    return ids, types


def augment_batch(batch: dict[str, np.ndarray], rng: np.random.Generator, delete: float = 0.0,
                  swap: float = 0.0, mask: float = 0.0) -> dict[str, np.ndarray]:
    """A copy of `batch` with its rows' token ids augmented (see the module doc)."""
    ids, types = batch['input_ids'].copy(), batch['token_type_ids'].copy()
    for row in range(ids.shape[0]):
        ids[row], types[row] = _augment_row(ids[row], types[row], rng, delete, swap, mask)
    return {**batch, 'input_ids': ids, 'token_type_ids': types,
            'attention_mask': (ids != PAD_ID).astype(batch['attention_mask'].dtype)}


class AugmentedBatches(encoding.TaskBatches):
    """`TaskBatches` whose batch(step) is augmented with a (seed, step, process) generator."""

    def __init__(self, encoded: dict[str, np.ndarray], global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, *, delete: float = 0.0,
                 swap: float = 0.0, mask: float = 0.0, dynamic_padding: bool = True):
        check_probabilities(delete, swap, mask)
        super().__init__(encoded, global_batch_size, seed, process_index, process_count,
                         dynamic_padding=dynamic_padding)
        self._augment = dict(delete=delete, swap=swap, mask=mask)
        self._key = (seed, process_index)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([*self._key, step])
        return augment_batch(super().batch(step), rng, **self._augment)


def task_batches(cfg, encoded: dict[str, np.ndarray], process_index: int,
                 process_count: int) -> encoding.TaskBatches:
    """The run's training batches: augmented when any `cfg.augment` probability is > 0."""
    probs = {k: float(cfg.augment[k]) for k in ('delete', 'swap', 'mask')} \
        if 'augment' in cfg else {}
    dynamic = bool(cfg.data.dynamic_padding)
    if not any(probs.values()):
        return encoding.TaskBatches(encoded, cfg.batch_size, cfg.seed, process_index, process_count,
                                dynamic_padding=dynamic)
    return AugmentedBatches(encoded, cfg.batch_size, cfg.seed, process_index, process_count,
                            **probs, dynamic_padding=dynamic)


def few_shot(examples: data.Examples, k: int, seed: int) -> data.Examples:
    """K examples per class (all of a class with fewer), seeded, in their original order."""
    if k < 1:
        raise ValueError(f'few_shot_k: must be >= 1, got {k}')
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(examples.labels):
        rows = np.flatnonzero(examples.labels == label)
        keep += list(rng.permutation(rows)[:k])
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    return data.Examples(
        text_a=[examples.text_a[i] for i in keep],
        text_b=None if examples.text_b is None else [examples.text_b[i] for i in keep],
        labels=examples.labels[keep])
