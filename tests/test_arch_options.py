"""The architecture options of BertConfig (issue 17): numerics against hand references,
parameter trees, validation, FLOPs, and bit-identity of the defaults with the old model."""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax.traverse_util import flatten_dict

from models.attention import (
    BertSelfAttention,
    apply_rotary,
    make_attention_mask,
    rotary_tables,
    sliding_window_mask,
)
from models.bert import BertForMaskedLM, BertForSequenceClassification, BertModel
from models.config import BertConfig, non_bert_options
from models.flops import forward_flops
from models.layers import BertIntermediate

REFERENCE = os.path.join(os.path.dirname(__file__), 'data', 'bert_defaults_reference.npz')
CFG = BertConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                 max_position_embeddings=16, num_labels=3)
ALL_ON = dict(position_embedding='rope', mlp='geglu', use_bias=False, final_norm=True,
              local_attention_window=4, global_attention_every=2, pooling='mean',
              pre_layer_norm=True)


def _np_gelu(x):
    return 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0)))


def _random_params(cfg: BertConfig, model: nn.Module, *args, seed: int = 0):
    """Cheap random float32 params (non-trivial scales and biases) from the init's shapes."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))['params']
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if 'scale' in name:
            return np.float32(1.0 + 0.1 * rng.standard_normal(leaf.shape))
        return np.float32(0.1 * rng.standard_normal(leaf.shape))

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes))


# ----------------------------------------------------------------------------- defaults


def test_defaults_reproduce_the_model_before_the_options_bit_for_bit():
    """Reference from the pre-issue-17 code (tests/data/make_bert_defaults_reference.py)."""
    ref = np.load(REFERENCE)
    ids, types, pos = ref['ids'], ref['types'], ref['positions']
    mask, seg = ref['mask'], ref['segments']
    for tag, pre in (('post', False), ('pre', True)):
        cfg = dataclasses.replace(CFG, pre_layer_norm=pre)
        mlm = BertForMaskedLM(cfg)
        v = nn.unbox(mlm.init(jax.random.key(0), ids, pos, types))
        params = flatten_dict(v['params'], sep='/')
        want = {k.split('/mlm_params/')[1]: ref[k] for k in ref if k.startswith(f'{tag}/mlm_p')}
        assert set(params) == set(want)
        for k, a in params.items():
            np.testing.assert_array_equal(a, want[k], err_msg=k)
        got = mlm.apply(v, ids, pos, types, mask, seg)
        np.testing.assert_array_equal(got, ref[f'{tag}/mlm_logits'])
        clf = BertForSequenceClassification(cfg)
        v = nn.unbox(clf.init(jax.random.key(1), ids, types))
        np.testing.assert_array_equal(clf.apply(v, ids, types, mask), ref[f'{tag}/clf_logits'])
        train = clf.apply(v, ids, types, mask, deterministic=False,
                          rngs={'dropout': jax.random.key(3)})
        np.testing.assert_array_equal(train, ref[f'{tag}/clf_train_logits'])
    assert non_bert_options(CFG) == []


# ----------------------------------------------------------------------------- RoPE


def _np_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Reference: rotate each pair (x[d], x[d + D/2]) by position * theta**(-2d/D)."""
    half = x.shape[-1] // 2
    out = np.empty_like(x, dtype=np.float64)
    for d in range(half):
        angle = positions * theta ** (-2.0 * d / x.shape[-1])  # (L,)
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        a, b = x[:, :, :, d], x[:, :, :, d + half]  # (B, L, heads)
        out[..., d] = a * c - b * s
        out[..., d + half] = a * s + b * c
    return out


def test_rope_matches_numpy_pair_rotation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 3, 8)).astype(np.float32)
    for theta in (10000.0, 100.0):
        cos, sin = rotary_tables(9, 8, theta)
        got = apply_rotary(jnp.asarray(x), cos, sin)
        np.testing.assert_allclose(got, _np_rope(x, np.arange(9.0), theta), atol=1e-5)
    # Position 0 is the identity and norms are preserved.
    np.testing.assert_allclose(got[:, 0], x[:, 0], atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


def test_rope_score_depends_only_on_the_position_difference():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 16)).astype(np.float32)
    cos, sin = rotary_tables(64, 16, 10000.0)
    # The same q and k at every position: rotated[p] is the vector placed at position p.
    rq = np.asarray(apply_rotary(jnp.broadcast_to(q, (1, 64, 1, 16)), cos, sin))[0, :, 0]
    rk = np.asarray(apply_rotary(jnp.broadcast_to(k, (1, 64, 1, 16)), cos, sin))[0, :, 0]
    for m, n in ((5, 2), (2, 5), (7, 7)):
        scores = [rq[m + s] @ rk[n + s] for s in (0, 3, 40)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    assert not np.isclose(rq[5] @ rk[2], rq[5] @ rk[3], atol=1e-3)  # but it does depend on it


def test_rope_self_attention_matches_numpy():
    cfg = dataclasses.replace(CFG, position_embedding='rope', rope_theta=500.0)
    x = np.random.default_rng(2).standard_normal((2, 7, 32)).astype(np.float32)
    mask = make_attention_mask(jnp.asarray([[1] * 7, [1] * 5 + [0] * 2]))
    module = BertSelfAttention(cfg)
    params = _random_params(cfg, module, x, mask, True)
    got = module.apply({'params': params}, x, mask, True)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q, k, v = (
        (x @ p[n]['kernel'] + p[n]['bias']).reshape(2, 7, 4, 8) for n in ('query', 'key', 'value'))
    q, k = _np_rope(q, np.arange(7.0), 500.0), _np_rope(k, np.arange(7.0), 500.0)
    logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(8.0)
    logits = np.where(np.asarray(mask), logits, -1e30)
    want = np.einsum('bhqk,bkhd->bqhd', scipy.special.softmax(logits, -1), v).reshape(2, 7, 32)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_rope_model_has_no_position_table_and_no_length_cap():
    cfg = dataclasses.replace(CFG, num_layers=1, position_embedding='rope')
    ids = np.random.default_rng(3).integers(0, 97, (1, 40)).astype(np.int32)  # 40 > 16
    model = BertModel(cfg)
    params = _random_params(cfg, model, ids)
    assert 'position_embeddings' not in params['embeddings']
    seq, _ = model.apply({'params': params}, ids)
    assert seq.shape == (1, 40, 32) and bool(np.isfinite(seq).all())
    with pytest.raises(ValueError, match='max_position_embeddings'):
        jax.eval_shape(lambda: BertModel(CFG).init(jax.random.key(0), ids))


# ----------------------------------------------------------------------------- gated MLP


@pytest.mark.parametrize('mlp', ['geglu', 'swiglu'])
def test_gated_mlp_matches_numpy(mlp):
    cfg = dataclasses.replace(CFG, mlp=mlp)
    x = np.random.default_rng(4).standard_normal((2, 5, 32)).astype(np.float32)
    module = BertIntermediate(cfg)
    params = _random_params(cfg, module, x)
    assert params['dense']['kernel'].shape == (32, 2 * 64)  # ModernBERT's Wi, transposed
    got = module.apply({'params': params}, x)
    h = x.astype(np.float64) @ params['dense']['kernel'] + params['dense']['bias']
    inputs, gate = h[..., :64], h[..., 64:]  # first half activated, second half the gate
    act = _np_gelu(inputs) if mlp == 'geglu' else inputs * scipy.special.expit(inputs)
    assert got.shape == (2, 5, 64)
    np.testing.assert_allclose(got, act * gate, atol=1e-5)


def test_gated_mlp_flops():
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_layers=2, num_heads=2,
                     intermediate_size=256, mlp='swiglu')
    s, h, i = 16, 64, 256
    # Per layer: q/k/v/output projections, scores and weights.V, then H->2I and I->H.
    per_layer = 4 * 2 * s * h * h + 2 * 2 * s * s * h + 2 * s * h * (2 * i) + 2 * s * i * h
    head = 2 * 3 * h * h + 2 * 3 * h * 100
    assert forward_flops(cfg, 4, s, 3) == pytest.approx(4 * (2 * per_layer + head))
    plain = dataclasses.replace(cfg, mlp='gelu')
    assert forward_flops(cfg, 4, s, 3) - forward_flops(plain, 4, s, 3) == pytest.approx(
        4 * 2 * (2 * s * h * i))  # one more H x I matmul per layer
    # Neither a window nor RoPE changes the count (every score is still computed).
    windowed = dataclasses.replace(cfg, local_attention_window=4, position_embedding='rope')
    assert forward_flops(windowed, 4, s, 3) == forward_flops(cfg, 4, s, 3)


# ----------------------------------------------------------------------------- sliding window


def test_sliding_window_mask_matches_brute_force():
    for length, window in ((11, 2), (11, 4), (9, 6), (5, 64)):
        got = np.asarray(sliding_window_mask(length, window))[0, 0]
        want = np.zeros((length, length), bool)
        for i in range(length):
            for j in range(length):
                want[i, j] = i - window // 2 <= j <= i + window // 2
        np.testing.assert_array_equal(got, want)


def test_global_layer_pattern():
    cfg = dataclasses.replace(CFG, num_layers=7, local_attention_window=8)
    assert [cfg.is_global_layer(i) for i in range(7)] == [True, False, False, True, False,
                                                           False, True]  # ModernBERT: i % 3
    none_global = dataclasses.replace(cfg, global_attention_every=0)
    assert not any(none_global.is_global_layer(i) for i in range(7))
    assert all(CFG.is_global_layer(i) for i in range(7))  # no window: all global


def test_local_layers_limit_the_receptive_field():
    """Two local layers of +-1 token: position i only hears tokens within +-2."""
    cfg = dataclasses.replace(CFG, local_attention_window=2, global_attention_every=0)
    ids = np.random.default_rng(5).integers(5, 97, (1, 12)).astype(np.int32)
    model = BertModel(cfg)
    params = _random_params(cfg, model, ids)
    apply = jax.jit(lambda p, i: model.apply({'params': p}, i)[0])
    changed = ids.copy()
    changed[0, 8] = 4
    delta = np.abs(np.asarray(apply(params, ids) - apply(params, changed)))[0].max(-1)
    assert (delta[:6] == 0).all() and (delta[11:] == 0).all() and (delta[6:11] > 0).all()
    # With layer 0 global the change reaches every position.
    glob = dataclasses.replace(cfg, global_attention_every=2)
    model = BertModel(glob)
    delta = np.abs(np.asarray(jax.jit(lambda p, i: model.apply({'params': p}, i)[0])(
        params, ids) - model.apply({'params': params}, changed)[0]))[0].max(-1)
    assert (delta > 0).all()


# ----------------------------------------------------------------------------- bias, norm, pool


def test_no_bias_and_final_norm_parameter_tree():
    cfg = dataclasses.replace(CFG, use_bias=False, final_norm=True)
    ids = np.zeros((1, 8), np.int32)
    mlm = flatten_dict(_random_params(cfg, BertForMaskedLM(cfg), ids, ids[:, :2]), sep='/')
    biases = sorted(k for k in mlm if k.endswith('bias'))
    assert biases == ['cls/predictions/bias']  # the vocab prior stays
    assert 'bert/encoder/final_layer_norm/scale' in mlm  # post-LN + final_norm
    clf = flatten_dict(_random_params(cfg, BertForSequenceClassification(cfg), ids), sep='/')
    assert sorted(k for k in clf if k.endswith('bias')) == ['classifier/bias']
    assert 'bert/pooler/dense/kernel' in clf


def test_final_norm_normalises_the_encoder_output():
    cfg = dataclasses.replace(CFG, num_layers=1, final_norm=True)
    ids = np.random.default_rng(6).integers(0, 97, (2, 8)).astype(np.int32)
    model = BertModel(cfg)
    params = _random_params(cfg, model, ids)
    ln = params['encoder']['final_layer_norm']
    ln['scale'], ln['bias'] = np.ones_like(ln['scale']), np.zeros_like(ln['bias'])
    seq = np.asarray(model.apply({'params': params}, ids)[0], np.float64)
    np.testing.assert_allclose(seq.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(seq.var(-1), 1.0, atol=1e-4)


def test_mean_pooling_matches_numpy_and_ignores_pads():
    cfg = dataclasses.replace(CFG, num_layers=1, pooling='mean')
    rng = np.random.default_rng(7)
    ids = rng.integers(5, 97, (2, 8)).astype(np.int32)
    mask = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)
    model = BertModel(cfg, add_pooling_layer=True)
    params = _random_params(cfg, model, ids)
    apply = jax.jit(lambda i: model.apply({'params': params}, i, None, mask))
    seq, pooled = apply(ids)
    seq = np.asarray(seq, np.float64)
    mean = np.stack([seq[0].mean(0), seq[1, :5].mean(0)])
    dense = params['pooler']['dense']
    np.testing.assert_allclose(pooled, np.tanh(mean @ dense['kernel'] + dense['bias']),
                               atol=1e-5)
    other = ids.copy()
    other[1, 5:] = 7  # different pad-position tokens: same pooled output
    np.testing.assert_array_equal(apply(other)[1], pooled)
    cls_model = BertModel(dataclasses.replace(cfg, pooling='cls'), add_pooling_layer=True)
    cls_pooled = cls_model.apply({'params': params}, ids, None, mask)[1]
    np.testing.assert_allclose(cls_pooled, np.tanh(seq[:, 0] @ dense['kernel'] + dense['bias']),
                               atol=1e-5)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize('overrides, message', [
    (dict(position_embedding='alibi'), 'position_embedding must be one of'),
    (dict(position_embedding='rope', hidden_size=36, num_heads=4), 'even head_dim, got 9'),
    (dict(position_embedding='rope', rope_theta=0.0), 'rope_theta must be > 0'),
    (dict(mlp='relu'), 'mlp must be one of'),
    (dict(pooling='max'), 'pooling must be one of'),
    (dict(local_attention_window=-4), 'local_attention_window must be 0'),
    (dict(local_attention_window=5), 'local_attention_window must be 0'),
    (dict(global_attention_every=-1), 'global_attention_every must be >= 0'),
    (dict(local_attention_window=8, global_attention_every=1), 'no effect'),
])
def test_bad_option_is_one_clear_line(overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        dataclasses.replace(CFG, **overrides)
    assert '\n' not in str(e.value)


def test_all_options_together_validate_and_are_named_for_export():
    cfg = dataclasses.replace(CFG, **ALL_ON)
    assert non_bert_options(cfg) == [
        "position_embedding='rope'", "mlp='geglu'", 'use_bias=False', 'final_norm=True',
        'local_attention_window=4', "pooling='mean'"]
