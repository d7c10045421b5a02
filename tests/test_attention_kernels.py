"""The attention kernels against `explicit_attention` with the dense mask: the cuDNN call's
arguments through XLA (same arguments, CPU), splash in Pallas interpret mode; and
`resolve_attention_impl`. Compared on real query positions (padding queries are undefined)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention as attention_lib
from models.attention import resolve_attention_impl
from models.attention_kernels import (
    AttentionInputs,
    cudnn_arguments,
    explicit_attention,
    splash_attention,
)
from models.bert import BertConfig, BertForMaskedLM

PAD_LENGTHS = (128, 93, 40)


def _inputs(batch: int, length: int, segments: bool, window: int) -> AttentionInputs:
    """Rows padded at the end; with `segments`, packed documents of uneven lengths."""
    lengths = [PAD_LENGTHS[i % 3] * length // 128 for i in range(batch)]
    mask = np.array([[1] * n + [0] * (length - n) for n in lengths], np.int32)
    seg = None
    if segments:
        cuts = np.array([[i * 37 % 29 < 9 for i in range(length)]] * batch)
        seg = jnp.asarray(np.cumsum(cuts, axis=1) * mask, jnp.int32)
    return AttentionInputs(jnp.asarray(mask), seg, window=window)


def _qkv(batch: int, length: int, heads: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (batch, length, heads, 16), jnp.float32).astype(dtype)
                 for k in keys)


def _real(x, inputs: AttentionInputs) -> np.ndarray:
    return np.float32(x)[np.asarray(inputs.attention_mask, bool)]


STRUCTURES = [  # (segments, window)
    (False, 0), (True, 0), (False, 16), (True, 16)]


@pytest.mark.parametrize('segments,window', STRUCTURES)
def test_cudnn_arguments_through_xla_match_explicit(segments, window):
    inputs = _inputs(3, 64, segments, window)
    q, k, v = _qkv(3, 64, 2, jnp.float32)
    args = cudnn_arguments(inputs)
    # Padding alone is expressed as lengths (cuDNN skips the padded keys), not as a mask.
    assert ('mask' not in args) == (not segments and not window)
    got = jax.nn.dot_product_attention(q, k, v, implementation='xla', **args)
    want = explicit_attention(q, k, v, inputs.dense_mask())
    np.testing.assert_allclose(_real(got, inputs), _real(want, inputs), atol=2e-6)


def test_xla_window_argument_is_the_symmetric_band():
    """local_window_size=(W/2, W/2) is the same band as sliding_window_mask (what a cuDNN
    that takes a right window would need); jax 0.10.2's cuDNN only takes a left one."""
    inputs = _inputs(2, 64, False, 16)
    q, k, v = _qkv(2, 64, 2, jnp.float32)
    got = jax.nn.dot_product_attention(
        q, k, v, implementation='xla', local_window_size=(8, 8),
        key_value_seq_lengths=inputs.attention_mask.sum(-1).astype(jnp.int32))
    want = explicit_attention(q, k, v, inputs.dense_mask())
    np.testing.assert_allclose(_real(got, inputs), _real(want, inputs), atol=2e-6)


SPLASH = functools.partial(splash_attention, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize('segments,window', STRUCTURES)
@pytest.mark.parametrize('dtype,atol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_splash_matches_explicit(segments, window, dtype, atol):
    inputs = _inputs(2, 128, segments, window)
    q, k, v = _qkv(2, 128, 2, dtype)
    got = jax.jit(SPLASH)(q, k, v, inputs)
    want = explicit_attention(q, k, v, inputs.dense_mask())
    assert got.dtype == want.dtype == dtype
    np.testing.assert_allclose(_real(got, inputs), _real(want, inputs), atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize('batch,length,heads', [(1, 256, 4), (3, 64, 1), (2, 200, 3)])
def test_splash_shapes_and_lengths_off_the_block(batch, length, heads):
    """Lengths that are no multiple of the 128 block (64, 200) are padded and cut back."""
    inputs = _inputs(batch, length, True, 32)
    q, k, v = _qkv(batch, length, heads, jnp.float32, seed=1)
    got = jax.jit(SPLASH)(q, k, v, inputs)
    assert got.shape == q.shape
    want = explicit_attention(q, k, v, inputs.dense_mask())
    np.testing.assert_allclose(_real(got, inputs), _real(want, inputs), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('segments,window', [(True, 0), (True, 16)])
def test_splash_gradients_match_explicit(segments, window):
    inputs = _inputs(2, 128, segments, window)
    q, k, v = _qkv(2, 128, 2, jnp.float32, seed=2)
    weight = jax.random.normal(jax.random.key(9), q.shape) * inputs.attention_mask[..., None, None]

    def loss(fn, q, k, v):  # real query positions only
        return jnp.sum(fn(q, k, v) * weight)

    splash = functools.partial(loss, lambda q, k, v: SPLASH(q, k, v, inputs))
    explicit = functools.partial(loss, lambda q, k, v: explicit_attention(
        q, k, v, inputs.dense_mask()))
    got = jax.jit(jax.grad(splash, argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(explicit, argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert float(jnp.abs(w).max()) > 1e-3  # a gradient that can be wrong
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)


@pytest.mark.slow
def test_splash_scanned_global_flag_picks_the_window():
    """A traced global flag (scanned layers) switches between the full and the local kernel."""
    inputs = _inputs(2, 128, True, 16)
    q, k, v = _qkv(2, 128, 2, jnp.float32, seed=3)
    run = jax.jit(lambda flag: SPLASH(q, k, v, inputs.for_layer(16, flag)))
    for flag in (True, False):
        layer = inputs.for_layer(16, flag)  # static: the dense reference
        want = explicit_attention(q, k, v, layer.dense_mask())
        np.testing.assert_allclose(_real(run(jnp.asarray(flag)), inputs),
                                   _real(want, inputs), atol=1e-5)


def _mlm(config: BertConfig, segments: bool):
    model = BertForMaskedLM(config)
    inputs = _inputs(2, 64, segments, 0)
    ids = jax.random.randint(jax.random.key(4), (2, 64), 5, config.vocab_size)
    positions = jnp.array([[1, 5, 9, 20], [0, 3, 17, 30]])
    params = model.init(jax.random.key(0), ids, positions)['params']

    def apply(p):
        return model.apply({'params': p}, ids, positions, attention_mask=inputs.attention_mask,
                           segment_ids=inputs.segment_ids)
    return params, apply


MODERN = BertConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2,
                    intermediate_size=64, max_position_embeddings=64, dropout_rate=0.0,
                    attention_dropout_rate=0.0, position_embedding='rope', mlp='geglu',
                    use_bias=False, pre_layer_norm=True, local_attention_window=16,
                    global_attention_every=3)


@pytest.mark.slow
@pytest.mark.parametrize('scan', [False, True])
def test_model_with_splash_matches_xla(monkeypatch, scan):
    """The whole MLM model (local/global layers, packed docs; scanned or not) gives the same
    logits and gradients with splash (interpret mode) as with the xla kernel."""
    monkeypatch.setattr(attention_lib, 'splash_attention', SPLASH)
    base = dataclasses.replace(MODERN, scan_layers=scan)
    params, xla = _mlm(dataclasses.replace(base, attention_impl='xla'), True)
    _, splash = _mlm(dataclasses.replace(base, attention_impl='splash'), True)
    np.testing.assert_allclose(jax.jit(splash)(params), xla(params), atol=1e-5)
    def loss(f):
        return (lambda p: jnp.sum(f(p) ** 2))
    got, want = jax.jit(jax.grad(loss(splash)))(params), jax.grad(loss(xla))(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4), got, want)


@pytest.mark.slow
def test_splash_under_a_data_parallel_mesh(monkeypatch):
    """With several devices the kernel runs per batch shard (shard_map) and agrees."""
    import flax.linen as nn
    from jax.sharding import Mesh
    monkeypatch.setattr(attention_lib, 'splash_attention', SPLASH)
    mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
    params, xla = _mlm(dataclasses.replace(MODERN, attention_impl='xla'), True)
    _, splash = _mlm(dataclasses.replace(MODERN, attention_impl='splash'), True)
    with jax.set_mesh(mesh), nn.logical_axis_rules([('batch', 'data')]):
        got = jax.jit(splash)(params)
    np.testing.assert_allclose(got, xla(params), atol=1e-5)


@pytest.mark.parametrize('impl,platform,dropout,dtype,want', [
    ('auto', 'cpu', 0.0, jnp.float32, 'xla'),
    ('auto', 'cpu', 0.1, jnp.float32, 'explicit'),
    ('auto', 'gpu', 0.0, jnp.bfloat16, 'cudnn'),
    ('auto', 'gpu', 0.0, jnp.float32, 'xla'),
    ('auto', 'gpu', 0.1, jnp.bfloat16, 'explicit'),
    ('auto', 'tpu', 0.0, jnp.float32, 'splash'),
    ('auto', 'tpu', 0.1, jnp.bfloat16, 'explicit'),
    ('splash', 'cpu', 0.0, jnp.float32, 'splash'),  # stored for another target: kept
    ('explicit', 'tpu', 0.0, jnp.bfloat16, 'explicit'),
])
def test_resolve_attention_impl(impl, platform, dropout, dtype, want):
    assert resolve_attention_impl(impl, platform, dropout, dtype) == want


def test_resolve_and_config_reject_bad_values():
    with pytest.raises(ValueError, match='attention_impl must be one of'):
        resolve_attention_impl('flash', 'gpu', 0.0, jnp.bfloat16)
    with pytest.raises(ValueError, match='platform'):
        resolve_attention_impl('auto', 'metal', 0.0, jnp.bfloat16)
    with pytest.raises(ValueError, match='no attention dropout'):
        resolve_attention_impl('cudnn', 'gpu', 0.1, jnp.bfloat16)
    with pytest.raises(ValueError, match='attention_impl must be one of'):
        BertConfig(attention_impl='flash')
    with pytest.raises(ValueError, match='attention_impl=splash has no attention dropout'):
        BertConfig(attention_impl='splash', attention_dropout_rate=0.1)


def test_prefix_tuning_with_splash_falls_back_to_the_dense_mask():
    """Prefix keys are open to every query, which segment ids cannot say: the layer uses the
    xla kernel on the dense mask, so the result equals attention_impl='xla'."""
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                     intermediate_size=64, dropout_rate=0.0, attention_dropout_rate=0.0,
                     prefix_length=3)
    params, xla = _mlm(dataclasses.replace(cfg, attention_impl='xla'), False)
    _, splash = _mlm(dataclasses.replace(cfg, attention_impl='splash'), False)
    np.testing.assert_array_equal(splash(params), xla(params))
