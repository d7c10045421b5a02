"""Span masking (masking.span_length) and the held-out masking (masking.eval_mask_rate)."""

import dataclasses

import jax
import numpy as np
import pytest

from configs.pretrain import get_config
from pretrain import objective
from pretrain.masking import (
    NUM_SPECIAL,
    MaskingConfig,
    mask_tokens,
    span_geometric_p,
    span_max_length,
)
from pretrain.sections import bert_config, masking_config
from text.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID

ROWS, LENGTH, VOCAB = 256, 128, 500


def _batch(rows: int, length: int) -> jax.Array:
    """[CLS] doc [SEP] doc [SEP] [PAD]* rows of varied lengths (a [SEP] at 20)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(NUM_SPECIAL, VOCAB, size=(rows, length)).astype(np.int32)
    ids[:, 0], ids[:, 20] = CLS_ID, SEP_ID
    for r, n in enumerate(rng.integers(30, length + 1, size=rows)):
        ids[r, n - 1], ids[r, n:] = SEP_ID, PAD_ID
    return jax.numpy.asarray(ids)


def _masked(out) -> np.ndarray:
    """(B, L) bool: the positions chosen for prediction."""
    pos, w = np.asarray(out['masked_positions']), np.asarray(out['masked_weights']) > 0
    chosen = np.zeros(np.asarray(out['input_ids']).shape, bool)
    for r in range(pos.shape[0]):
        chosen[r, pos[r][w[r]]] = True
    return chosen


def _runs(chosen: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, start, length) of every maximal run of chosen positions."""
    out = []
    for r, row in enumerate(chosen):
        edges = np.diff(np.concatenate([[0], row.astype(int), [0]]))
        starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
        out += [(r, s, e - s) for s, e in zip(starts, ends, strict=True)]
    return out


@pytest.fixture(scope='module')
def spans():
    """Span masking at Mosaic's 30 % with mean span 3 on 256 rows of 128 tokens."""
    ids = _batch(rows=ROWS, length=LENGTH)
    cfg = MaskingConfig(vocab_size=VOCAB, max_predictions=40, mask_rate=0.3, span_length=3.0)
    fn = jax.jit(lambda key: mask_tokens(key, ids, cfg))
    return np.asarray(ids), cfg, fn, fn(jax.random.key(0))


def test_masked_fraction_is_the_mask_rate(spans):
    ids, cfg, _, out = spans
    real = np.isin(ids, [PAD_ID, CLS_ID, SEP_ID], invert=True).sum(1)
    got = np.asarray(out['masked_weights']).sum(1)
    # float32, as on device (x.5 cases round the same way)
    budget = np.clip(np.round(real.astype(np.float32) * np.float32(cfg.mask_rate)), 1,
                     cfg.max_predictions)
    assert (got <= budget).all()
    # Fragmentation may leave a row a token or two short; overall the rate holds.
    assert abs(got.sum() / real.sum() - 0.3) < 0.005, got.sum() / real.sum()
    assert (got >= budget - 2).all()


def test_spans_are_contiguous_with_the_mean_length_and_avoid_specials(spans):
    ids, cfg, _, out = spans
    chosen = _masked(out)
    assert not np.isin(ids[chosen], [PAD_ID, CLS_ID, SEP_ID]).any()
    runs = _runs(chosen)
    lengths = np.array([n for _, _, n in runs])
    # Each row's last span is cut to its budget, which pulls the mean a little below 3.
    assert 2.6 < lengths.mean() < 3.05, lengths.mean()
    assert lengths.max() <= span_max_length(3.0) and (lengths > 1).mean() > 0.5
    # No run crosses a special token: every token inside a run is an ordinary one.
    for r, start, n in runs:
        assert not np.isin(ids[r, start:start + n], [PAD_ID, CLS_ID, SEP_ID]).any()


def test_replacement_is_80_10_10_per_token(spans):
    ids, _, _, out = spans
    chosen = _masked(out)
    new = np.asarray(out['input_ids'])
    assert abs((new[chosen] == MASK_ID).mean() - 0.8) < 0.02
    assert abs((new[chosen] == ids[chosen]).mean() - 0.1) < 0.02
    np.testing.assert_array_equal(new[~chosen], ids[~chosen])  # nothing else changes


def test_span_masking_is_a_function_of_the_key(spans):
    _, _, fn, out = spans
    again, other = fn(jax.random.key(0)), fn(jax.random.key(1))
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])
    assert not np.array_equal(out['masked_positions'], other['masked_positions'])


def test_span_length_one_masks_isolated_tokens():
    ids = _batch(rows=32, length=64)
    cfg = MaskingConfig(vocab_size=VOCAB, max_predictions=10, span_length=1.0)
    out = jax.jit(lambda key: mask_tokens(key, ids, cfg))(jax.random.key(2))
    lengths = [n for _, _, n in _runs(_masked(out))]
    assert lengths and set(lengths) == {1}


@pytest.mark.parametrize('mean', [1.5, 3.0, 3.8, 8.0])
def test_geometric_p_gives_the_clipped_mean(mean):
    cap = span_max_length(mean)
    p = span_geometric_p(mean, cap)
    clipped = np.minimum(np.random.default_rng(0).geometric(p, 200_000), cap)
    assert abs(clipped.mean() - mean) < 0.02 * mean


def _objective(cfg) -> objective.ObjectiveConfig:
    return objective.ObjectiveConfig.from_config(cfg, bert_config(cfg))


def test_eval_masks_tokens_at_eval_mask_rate():
    cfg = get_config('tiny')
    train = masking_config(cfg, 100)
    assert objective.eval_masking(_objective(cfg), train, cfg.seq_len) == train  # as before
    cfg.masking.mask_rate, cfg.masking.span_length = 0.3, 3.0
    train = masking_config(cfg, 100)
    assert (train.max_predictions, train.span_length) == (39, 3.0)
    held_out = objective.eval_masking(_objective(cfg), train, cfg.seq_len)
    assert held_out == dataclasses.replace(train, mask_rate=0.15, max_predictions=20,
                                           span_length=0.0)
