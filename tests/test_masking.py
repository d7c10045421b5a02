"""The masked-LM objective: which tokens are predicted, how they are corrupted, the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain.masking import NUM_SPECIAL, MaskingConfig, mask_tokens, mlm_loss_terms
from text.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID

VOCAB = 500


def _batch(rows=256, length=64, seed=0):
    """[CLS] doc [SEP] doc [SEP] ... [PAD]* rows with varied lengths."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(NUM_SPECIAL, VOCAB, size=(rows, length)).astype(np.int32)
    ids[:, 0] = CLS_ID
    ids[:, 20] = SEP_ID
    for r, n in enumerate(rng.integers(30, length + 1, size=rows)):
        ids[r, n - 1] = SEP_ID
        ids[r, n:] = PAD_ID
    return jnp.asarray(ids)


@pytest.mark.slow
def test_specials_never_chosen_and_rate_is_15_percent():
    ids = _batch()
    cfg = MaskingConfig(vocab_size=VOCAB, max_predictions=10)
    out = mask_tokens(jax.random.key(0), ids, cfg)
    pos, w = np.asarray(out['masked_positions']), np.asarray(out['masked_weights'])
    chosen = np.take_along_axis(np.asarray(ids), pos, axis=1)[w > 0]
    assert not np.isin(chosen, [PAD_ID, CLS_ID, SEP_ID]).any()
    real = np.isin(np.asarray(ids), [PAD_ID, CLS_ID, SEP_ID], invert=True).sum(1)
    np.testing.assert_array_equal(w.sum(1), np.clip(np.round(real * 0.15), 1, 10))
    # Chosen slots are distinct positions within each row.
    for p, wr in zip(pos, w, strict=True):
        assert len(set(p[wr > 0])) == int(wr.sum())


def test_80_10_10_replacement_statistics():
    ids = _batch(rows=2048)
    cfg = MaskingConfig(vocab_size=VOCAB, max_predictions=10)
    out = mask_tokens(jax.random.key(1), ids, cfg)
    pos, w = np.asarray(out['masked_positions']), np.asarray(out['masked_weights']) > 0
    new = np.take_along_axis(np.asarray(out['input_ids']), pos, 1)[w]
    old = np.take_along_axis(np.asarray(ids), pos, 1)[w]
    np.testing.assert_array_equal(np.asarray(out['masked_labels'])[w], old)
    frac_mask = (new == MASK_ID).mean()
    frac_same = (new == old).mean()  # includes random draws that hit the same token (~0.02%)
    frac_random = ((new != MASK_ID) & (new != old)).mean()
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_same - 0.1) < 0.015
    assert abs(frac_random - 0.1) < 0.015
    assert new[(new != MASK_ID) & (new != old)].min() >= NUM_SPECIAL
    # Nothing outside the chosen slots changed.
    changed = np.asarray(out['input_ids']) != np.asarray(ids)
    rows, cols = np.nonzero(changed)
    for r, c in zip(rows, cols, strict=True):
        assert c in pos[r][w[r]]


def test_masking_is_a_function_of_the_key():
    ids = _batch(rows=8)
    cfg = MaskingConfig(vocab_size=VOCAB, max_predictions=10)
    a, b = mask_tokens(jax.random.key(3), ids, cfg), mask_tokens(jax.random.key(3), ids, cfg)
    c = mask_tokens(jax.random.key(4), ids, cfg)
    np.testing.assert_array_equal(a['input_ids'], b['input_ids'])
    assert not np.array_equal(a['masked_positions'], c['masked_positions'])


def test_all_padding_row_predicts_nothing():
    ids = jnp.zeros((2, 16), jnp.int32)
    out = mask_tokens(jax.random.key(0), ids, MaskingConfig(vocab_size=VOCAB, max_predictions=3))
    assert float(out['masked_weights'].sum()) == 0
    np.testing.assert_array_equal(out['input_ids'], ids)


def test_whole_word_masking_takes_every_piece_of_a_word():
    ids = _batch(rows=64)
    word_starts = np.zeros(VOCAB, bool)
    word_starts[:NUM_SPECIAL] = True
    word_starts[NUM_SPECIAL::3] = True  # about a third of pieces start a word
    cfg = MaskingConfig(vocab_size=VOCAB, max_predictions=12, whole_word=True)
    out = mask_tokens(jax.random.key(5), ids, cfg, jnp.asarray(word_starts))
    ids_np, pos, w = np.asarray(ids), np.asarray(out['masked_positions']), np.asarray(
        out['masked_weights'])
    assert w.sum() > 0.1 * 64 * 6  # most of the budget is used
    for r in range(ids_np.shape[0]):
        special = np.isin(ids_np[r], [PAD_ID, CLS_ID, SEP_ID])
        starts = word_starts[ids_np[r]] | special
        word = np.cumsum(starts)
        chosen = set(pos[r][w[r] > 0])
        for c in chosen:
            members = set(np.nonzero((word == word[c]) & ~special)[0])
            assert members <= chosen, (r, c)


def test_loss_terms_are_sums_over_weighted_slots():
    logits = jnp.log(jnp.asarray([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))
    labels = jnp.asarray([[0, 1]])
    terms = mlm_loss_terms(logits, labels, jnp.asarray([[1.0, 1.0]]))
    assert float(terms['loss_sum']) == pytest.approx(-np.log(0.7) - np.log(0.1), rel=1e-5)
    assert float(terms['correct_sum']) == 1.0 and float(terms['weight_sum']) == 2.0
    only_first = mlm_loss_terms(logits, labels, jnp.asarray([[1.0, 0.0]]))
    assert float(only_first['loss_sum']) == pytest.approx(-np.log(0.7), rel=1e-5)
