"""CPU tests for models/bert.py: shapes, parameter naming/partitioning, masking, dtype, remat."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from flax.traverse_util import flatten_dict

from models import attention as attention_lib
from models import bert as bert_lib
from models.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    explicit_attention,
)

CFG = BertConfig(
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    num_labels=3,
)
# One layer where only compute matters: XLA's CPU compile time dominates these tests.
CFG1 = dataclasses.replace(CFG, num_layers=1)
B, L, P = 2, 12, 3
ALLOWED_AXES = {'batch', 'length', 'embed', 'mlp', 'heads', 'kv', 'vocab', None}


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    # numpy (not jnp) so test-side edits do not compile one XLA program per eager op.
    ids = rng.integers(0, CFG.vocab_size, (B, L)).astype(np.int32)
    types = rng.integers(0, CFG.type_vocab_size, (B, L)).astype(np.int32)
    positions = rng.integers(0, L, (B, P)).astype(np.int32)
    return ids, types, positions


def _random_params(shapes, seed: int = 0):
    """Cheap float32 params from an eval_shape tree (avoids compiling `init` in every test).

    Biases get small non-zero values so that tests also exercise them.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if 'scale' in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        return jnp.asarray(0.05 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(shapes['params']))


def _shapes(model_cls: type[nn.Module], cfg: BertConfig = CFG):
    """Abstract (boxed) variables of a model's init: names, shapes, dtypes and logical specs."""
    ids, types, positions = _inputs()
    args = (ids, positions, types) if model_cls is BertForMaskedLM else (ids, types)
    return jax.eval_shape(lambda: model_cls(cfg).init(jax.random.key(0), *args))


@functools.cache
def _mlm_fn(cfg: BertConfig):
    """One jitted MLM forward per config; every test passes all inputs so it compiles once."""
    model = BertForMaskedLM(cfg)

    def fwd(params, ids, positions, types, mask, segments):
        return model.apply({'params': params}, ids, positions, types, mask, segments)

    return jax.jit(fwd)


@functools.cache
def _encoder_fn(cfg: BertConfig):
    model = BertModel(cfg)

    def fwd(params, ids, types, mask, segments):
        return model.apply({'params': params}, ids, types, mask, segments)[0]

    return jax.jit(fwd)


def _mlm(params, ids, positions, types, mask=None, segments=None, cfg: BertConfig = CFG):
    # All-ones segments == no packing, so one compiled function serves both cases.
    ones = np.ones_like(ids)
    mask, segments = ones if mask is None else mask, ones if segments is None else segments
    return _mlm_fn(cfg)(params, ids, positions, types, mask, segments)


def _encode(params, ids, types, mask=None, segments=None):
    ones = np.ones_like(ids)
    mask, segments = ones if mask is None else mask, ones if segments is None else segments
    return _encoder_fn(CFG)(params['bert'], ids, types, mask, segments)


@pytest.fixture(scope='module')
def mlm():
    return BertForMaskedLM(CFG), _random_params(_shapes(BertForMaskedLM))


def _paths(tree) -> set[str]:
    return set(flatten_dict(tree, sep='/'))


# ----------------------------------------------------------------------------- shapes / config


def test_output_shapes(mlm):
    ids, types, positions = _inputs()
    model, params = mlm
    logits = _mlm(params, ids, positions, types)
    assert logits.shape == (B, P, CFG.vocab_size) and logits.dtype == jnp.float32

    key = jax.random.key(0)
    for pool in (True, False):
        encoder = BertModel(CFG, add_pooling_layer=pool)
        seq, pooled = jax.eval_shape(lambda e=encoder: e.init_with_output(key, ids)[0])
        assert seq.shape == (B, L, CFG.hidden_size)
        assert (pooled.shape == (B, CFG.hidden_size)) if pool else pooled is None

    clf = BertForSequenceClassification(CFG)
    out = jax.eval_shape(lambda: clf.init_with_output(key, ids, types)[0])
    assert out.shape == (B, CFG.num_labels) and out.dtype == jnp.float32


def test_init_values():
    ids, types, positions = _inputs()
    key = jax.random.key(0, impl='rbg')  # faster to compile than threefry on CPU
    variables = jax.jit(BertForMaskedLM(CFG1).init)(key, ids, positions, types)
    flat = flatten_dict(nn.unbox(variables['params']), sep='/')
    for path, value in flat.items():
        assert value.dtype == jnp.float32, path
        x = np.asarray(value)  # numpy stats: no per-shape XLA compiles
        if path.endswith('scale'):
            np.testing.assert_array_equal(x, 1.0)
        elif path.endswith('bias'):
            np.testing.assert_array_equal(x, 0.0)
        else:  # truncated normal at +-2 std
            assert np.abs(x).max() <= 2 * CFG.initializer_range + 1e-7, path
            assert 0.5 * CFG.initializer_range < x.std() < CFG.initializer_range, path


@pytest.mark.parametrize(
    'overrides',
    [
        {'hidden_size': 30, 'num_heads': 4},
        {'dtype': 'float16'},
        {'remat': 'some'},
        {'dropout_rate': 1.0},
    ],
)
def test_bad_config_raises(overrides):
    with pytest.raises(ValueError):
        BertConfig(**overrides)


def test_too_long_sequence_raises():
    ids = jnp.zeros((1, CFG.max_position_embeddings + 1), jnp.int32)
    with pytest.raises(ValueError, match='max_position_embeddings'):
        jax.eval_shape(lambda: BertModel(CFG).init(jax.random.key(0), ids))


# ----------------------------------------------------------------------------- parameter tree


_PER_LAYER = [
    f'attention/self/{n}/{p}' for n in ('query', 'key', 'value') for p in ('kernel', 'bias')
] + [
    f'{block}/{leaf}'
    for block in ('attention/output', 'output')
    for leaf in ('dense/kernel', 'dense/bias', 'LayerNorm/scale', 'LayerNorm/bias')
] + ['intermediate/dense/kernel', 'intermediate/dense/bias']


def test_mlm_param_names(mlm):
    _, params = mlm
    expected = {
        f'bert/embeddings/{n}/embedding'
        for n in ('word_embeddings', 'position_embeddings', 'token_type_embeddings')
    } | {
        'bert/embeddings/LayerNorm/scale',
        'bert/embeddings/LayerNorm/bias',
        'cls/predictions/transform/dense/kernel',
        'cls/predictions/transform/dense/bias',
        'cls/predictions/transform/LayerNorm/scale',
        'cls/predictions/transform/LayerNorm/bias',
        'cls/predictions/bias',
    }
    for i in range(CFG.num_layers):
        expected |= {f'bert/encoder/layer_{i}/{p}' for p in _PER_LAYER}
    assert _paths(params) == expected
    assert set(params['bert']['encoder']) == {f'layer_{i}' for i in range(CFG.num_layers)}
    # Shapes the exporter relies on (HF Linear weights are the transposes).
    layer = params['bert']['encoder']['layer_1']
    assert layer['intermediate']['dense']['kernel'].shape == (32, 64)
    assert layer['output']['dense']['kernel'].shape == (64, 32)
    assert layer['attention']['self']['query']['kernel'].shape == (32, 32)
    assert params['cls']['predictions']['bias'].shape == (CFG.vocab_size,)
    assert 'decoder' not in params['cls']['predictions']  # tied: no separate matrix


def test_classifier_param_names():
    shapes = _shapes(BertForSequenceClassification)
    paths = _paths(nn.unbox(shapes['params']))
    assert {
        'bert/pooler/dense/kernel',
        'bert/pooler/dense/bias',
        'classifier/kernel',
        'classifier/bias',
        'bert/encoder/layer_1/attention/self/value/kernel',
    } <= paths
    assert not any(p.startswith('cls/') for p in paths)
    assert len([p for p in paths if p.startswith('bert/encoder/')]) == 2 * len(_PER_LAYER)
    assert shapes['params']['classifier']['kernel'].value.shape == (32, CFG.num_labels)


def _expected_axes(path: str) -> tuple:
    """The logical names each parameter must carry, keyed on its HF-style path."""
    rules = [
        ('word_embeddings/embedding', ('vocab', 'embed')),
        ('position_embeddings/embedding', (None, 'embed')),
        ('token_type_embeddings/embedding', (None, 'embed')),
        ('LayerNorm/', ('embed',)),
        ('final_layer_norm/', ('embed',)),
        ('attention/self/', {'kernel': ('embed', 'heads'), 'bias': ('heads',)}),
        ('attention/output/dense/', {'kernel': ('heads', 'embed'), 'bias': ('embed',)}),
        ('intermediate/dense/', {'kernel': ('embed', 'mlp'), 'bias': ('mlp',)}),
        ('output/dense/', {'kernel': ('mlp', 'embed'), 'bias': ('embed',)}),
        ('cls/predictions/bias', ('vocab',)),
        ('/dense/', {'kernel': ('embed', None), 'bias': (None,)}),  # pooler, MLM transform
        ('classifier/', {'kernel': ('embed', None), 'bias': (None,)}),
    ]
    for key, axes in rules:
        if key in path:
            return axes[path.rsplit('/', 1)[1]] if isinstance(axes, dict) else axes
    raise AssertionError(f'no rule for {path}')


@pytest.mark.parametrize('model_cls', [BertForMaskedLM, BertForSequenceClassification])
def test_every_param_has_logical_spec(model_cls):
    shapes = _shapes(model_cls, dataclasses.replace(CFG, pre_layer_norm=True))
    specs = flatten_dict(nn.get_partition_spec(shapes)['params'], sep='/')
    values = flatten_dict(nn.unbox(shapes['params']), sep='/')
    assert specs.keys() == values.keys()
    assert any('final_layer_norm' in p for p in specs)
    for path, spec in specs.items():
        assert isinstance(spec, jax.sharding.PartitionSpec), path
        assert len(spec) == values[path].ndim, path
        assert set(spec) <= ALLOWED_AXES, path
        assert tuple(spec) == _expected_axes(path), path


# ----------------------------------------------------------------------------- masking


def test_padding_invariance(mlm):
    _, params = mlm
    ids, types, _ = _inputs()
    mask = np.ones((B, L), np.int32)
    mask[:, 8:] = 0
    other_ids, other_types = ids.copy(), types.copy()
    other_ids[:, 8:] = (ids[:, 8:] + 5) % CFG.vocab_size
    other_types[:, 8:] = 1 - types[:, 8:]
    a = _encode(params, ids, types, mask)
    b = _encode(params, other_ids, other_types, mask)
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not np.allclose(a[:, 8:], b[:, 8:])  # padded positions themselves did change

    real_positions = np.array([[0, 3, 7]] * B, np.int32)
    la = _mlm(params, ids, real_positions, types, mask)
    lb = _mlm(params, other_ids, real_positions, other_types, mask)
    np.testing.assert_allclose(la, lb, atol=1e-5)


def test_segment_ids_block_cross_segment_attention(mlm):
    _, params = mlm
    ids, types, _ = _inputs()
    # Two packed documents (positions 0-4 and 5-9) then two padding tokens.
    segments = np.array([[1] * 5 + [2] * 5 + [0] * 2] * B, np.int32)
    mask = (segments > 0).astype(np.int32)
    other_ids = ids.copy()
    other_ids[:, 5:] = (ids[:, 5:] + 11) % CFG.vocab_size
    a = _encode(params, ids, types, mask, segments)
    b = _encode(params, other_ids, types, mask, segments)
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not np.allclose(a[:, 5:10], b[:, 5:10])
    # Without segment ids the first document does see the second one.
    c, d = _encode(params, ids, types, mask), _encode(params, other_ids, types, mask)
    assert not np.allclose(c[:, :5], d[:, :5])


def test_make_attention_mask():
    mask = bert_lib.make_attention_mask(jnp.array([[1, 1, 1, 0]]), jnp.array([[1, 1, 2, 2]]))
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]], bool)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask[0, 0], expected)
    no_seg = bert_lib.make_attention_mask(jnp.array([[1, 1, 0]]))
    assert no_seg.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(no_seg[0, 0], [[1, 1, 0]] * 3)


# ----------------------------------------------------------------------------- attention paths


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_explicit_attention_matches_dot_product_attention(dtype):
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 4, 8)), dtype) for _ in range(3))
    mask = bert_lib.make_attention_mask(
        jnp.array([[1, 1, 1, 1, 0, 0], [1] * 6]), jnp.array([[1, 1, 2, 2, 3, 3], [1] * 6])
    )  # includes fully-masked query rows (segment 3 is all padding)
    got = jax.jit(explicit_attention)(q, k, v, mask)
    want = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=mask)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol)


def test_explicit_path_matches_in_full_model(mlm, monkeypatch):
    model, params = mlm
    ids, types, positions = _inputs()
    segments = np.array([[1] * 6 + [2] * 6] * B, np.int32)
    want = _mlm(params, ids, positions, types, segments=segments)

    def explicit(q, k, v, mask):
        return explicit_attention(q, k, v, mask)

    monkeypatch.setattr(attention_lib, 'fused_attention', explicit)
    # A fresh jit so the patched function is traced (the cached one would not be).
    got = jax.jit(
        lambda p: model.apply({'params': p}, ids, positions, types, segment_ids=segments)
    )(params)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_dropout_rng_behaviour(mlm):
    model, params = mlm
    ids, types, positions = _inputs()

    @jax.jit
    def run(key):
        return model.apply(
            {'params': params}, ids, positions, types, deterministic=False, rngs={'dropout': key}
        )

    # rbg keys compile much faster than threefry on CPU; flax's rng plumbing is the same.
    key1, key2 = jax.random.key(1, impl='rbg'), jax.random.key(2, impl='rbg')
    a, b, c = run(key1), run(key1), run(key2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, _mlm(params, ids, positions, types))


# ----------------------------------------------------------------------------- dtype / variants


def test_bf16_compute_keeps_fp32_params_and_logits(mlm):
    _, params = mlm
    ids, types, positions = _inputs()
    cfg16 = dataclasses.replace(CFG, dtype='bfloat16')
    for model_cls in (BertForMaskedLM, BertForSequenceClassification):
        leaves = jax.tree.leaves(nn.unbox(_shapes(model_cls, cfg16)['params']))
        assert all(x.dtype == jnp.float32 for x in leaves)

    logits32 = _mlm(params, ids, positions, types)
    logits16 = _mlm(params, ids, positions, types, cfg=cfg16)
    assert logits16.dtype == jnp.float32
    scale = float(np.abs(logits32).max())
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale)

    clf_params = _random_params(_shapes(BertForSequenceClassification))
    out = jax.jit(BertForSequenceClassification(cfg16).apply)({'params': clf_params}, ids, types)
    assert out.shape == (B, CFG.num_labels) and out.dtype == jnp.float32


def test_pre_layer_norm(mlm):
    cfg = dataclasses.replace(CFG, pre_layer_norm=True)
    params = _random_params(_shapes(BertForMaskedLM, cfg))
    assert set(params['bert']['encoder']['final_layer_norm']) == {'scale', 'bias'}
    assert 'final_layer_norm' not in mlm[1]['bert']['encoder']
    ids, types, positions = _inputs()
    logits = _mlm(params, ids, positions, types, cfg=cfg)
    assert logits.shape == (B, P, CFG.vocab_size) and bool(np.isfinite(logits).all())
    post_params = {**params, 'bert': {**params['bert'], 'encoder': mlm[1]['bert']['encoder']}}
    post = _mlm(post_params, ids, positions, types)
    assert not np.allclose(logits, post)  # the block ordering really differs


def _loss_and_grads(cfg: BertConfig, params):
    ids, types, positions = _inputs()
    labels = np.take_along_axis(ids, positions, axis=1)
    model = BertForMaskedLM(cfg)

    def loss_fn(p):
        # Dropout on: remat must replay the same masks in the recomputation (rbg: fast compile).
        rngs = {'dropout': jax.random.key(7, impl='rbg')}
        logits = model.apply(
            {'params': p}, ids, positions, types, deterministic=False, rngs=rngs
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def _remat_policies_in_jaxpr(cfg: BertConfig, params) -> list[str]:
    ids, types, positions = _inputs()
    model = BertForMaskedLM(cfg)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({'params': p}, ids, positions, types))(params))
    return [line.strip() for line in jaxpr.splitlines() if 'policy=' in line]


@pytest.mark.slow
def test_remat_matches_no_remat():
    params = _random_params(_shapes(BertForMaskedLM, CFG1))
    assert _remat_policies_in_jaxpr(CFG1, params) == []
    loss_ref, grads_ref = _loss_and_grads(CFG1, params)
    for mode, policy in (('full', 'policy=None'), ('dots', 'policy=DotsSaveable')):
        cfg = dataclasses.replace(CFG1, remat=mode)
        # The layer really is checkpointed, with the requested policy.
        policies = _remat_policies_in_jaxpr(cfg, params)
        assert len(policies) == cfg.num_layers and all(p.startswith(policy) for p in policies)
        loss, grads = _loss_and_grads(cfg, params)
        np.testing.assert_allclose(loss, loss_ref, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, grads_ref)


def test_mlm_decoder_is_tied_to_word_embeddings(mlm):
    _, params = mlm
    ids, types, positions = _inputs()
    logits = _mlm(params, ids, positions, types)

    # Reference head in float64 numpy from the encoder output at the masked positions.
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    seq = np.asarray(_encode(params, ids, types), np.float64)
    hidden = np.take_along_axis(seq, positions[..., None], axis=1)
    head = p['cls']['predictions']
    h = hidden @ head['transform']['dense']['kernel'] + head['transform']['dense']['bias']
    h = 0.5 * h * (1.0 + scipy.special.erf(h / np.sqrt(2.0)))  # exact GELU
    ln = head['transform']['LayerNorm']
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + CFG.layer_norm_eps)
    h = h * ln['scale'] + ln['bias']
    table = p['bert']['embeddings']['word_embeddings']['embedding']
    np.testing.assert_allclose(logits, h @ table.T + head['bias'], atol=1e-5)


# ----------------------------------------------------------------------------- sharding


def test_runs_under_mesh_and_logical_rules(mlm):
    model, params = mlm
    ids, types, positions = _inputs()
    want = _mlm(params, ids, positions, types)
    # Auto axes: flax's logical constraints become with_sharding_constraint hints.
    mesh = jax.make_mesh((1, 1), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (
        ('batch', 'data'), ('length', None), ('embed', None), ('mlp', 'model'),
        ('heads', 'model'), ('kv', None), ('vocab', 'model'),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = jax.jit(lambda p: model.apply({'params': p}, ids, positions, types))(params)
    np.testing.assert_allclose(got, want, atol=1e-6)
