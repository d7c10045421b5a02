"""Freezing and the fine-tuning optimizer on a real tiny classifier: labels per mode, the
trainable/frozen split under jit and sharding, no gradients / state / change for frozen
leaves, clipping over trainable gradients only, learning-rate groups, L2-SP."""

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine.optim import OptimizerConfig, learning_rate_at, make_optimizer, peak_learning_rates
from engine.step import FROZEN, TRAIN, merge_params, split_params
from finetune.freeze import count_params_by_label, freeze_labels, tree_bytes
from models.bert import BertConfig, BertForSequenceClassification
from models.paths import path_of

LAYERS = 3
MODEL = BertForSequenceClassification(BertConfig(
    vocab_size=50, hidden_size=16, num_layers=LAYERS, num_heads=2, intermediate_size=32,
    max_position_embeddings=16, num_labels=3, dropout_rate=0.0, attention_dropout_rate=0.0))
TOTAL = 8115  # parameters of MODEL
HEAD = 16 * 16 + 16 + 16 * 3 + 3  # pooler + classifier
IDS = np.random.default_rng(0).integers(5, 50, (8, 8)).astype(np.int32)
BATCH = {'input_ids': IDS, 'labels': np.arange(8, dtype=np.int32) % 3}


@functools.cache
def _boxed():
    # jit: one compile beats ~1k eager op dispatches on the 2-core test machine.
    return jax.jit(MODEL.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))['params']


def _params():
    return jax.device_get(nn.unbox(_boxed()))


def _flat(tree) -> dict:
    return {path_of(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _frozen(labels) -> set[str]:
    return {p for p, lab in _flat(labels).items() if lab == FROZEN}


def _paths(*prefixes: str) -> set[str]:
    return {p for p in _flat(_params()) if p.startswith(prefixes)}


def _cfg(**overrides) -> OptimizerConfig:
    c = ml_collections.ConfigDict(dict(
        learning_rate=1e-2, head_learning_rate=0.0, warmup_fraction=0.0, weight_decay=0.0,
        layer_decay=1.0, max_grad_norm=0.0, b1=0.9, b2=0.999, eps=1e-6, l2sp=0.0))
    c.update(overrides)
    return OptimizerConfig.from_config(c, '')


def _loss(trainable, frozen, batch):
    logits = MODEL.apply({'params': merge_params(trainable, frozen)}, batch['input_ids'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['labels']).mean()


def _step_fn(tx, labels):
    """The train-step contract: differentiate the trainable half only."""
    @jax.jit
    def step(params, opt_state, batch):
        trainable, frozen = split_params(params, labels)
        grads = jax.grad(_loss)(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return merge_params(optax.apply_updates(trainable, updates), frozen), opt_state
    return step


def test_freeze_modes_select_exact_paths():
    params = _params()
    modes = {
        'none': set(),
        'embeddings': _paths('bert/embeddings/'),
        'layers:0': _paths('bert/embeddings/'),
        'layers:2': _paths('bert/embeddings/', 'bert/encoder/layer_0/', 'bert/encoder/layer_1/'),
        'layers:3': _paths('bert/embeddings/', 'bert/encoder/'),
        'encoder': _paths('bert/embeddings/', 'bert/encoder/'),
        're:query/kernel$, LayerNorm': {p for p in _flat(params)
                                         if p.endswith('query/kernel') or 'LayerNorm' in p},
        ('bert/encoder/layer_0/.*', '^classifier/bias'):
            _paths('bert/encoder/layer_0/', 'classifier/bias'),
    }
    for freeze, expected in modes.items():
        assert _frozen(freeze_labels(params, freeze, LAYERS)) == expected, freeze
    assert _paths('bert/pooler/', 'classifier/') == set(_flat(params)) - modes['encoder']
    # Boxed (nn.Partitioned) parameters give the same paths and labels.
    assert _frozen(freeze_labels(_boxed(), 'layers:2', LAYERS)) == modes['layers:2']


@pytest.mark.parametrize('freeze', ['everything', 'bert/encoder', 'layers:4', 'layers:x',
                                    'layers:-1', 're:nothing_matches', 're:', 're:(',
                                    ['bert/embeddings/', 'typo_layer'], []])
def test_bad_freeze_values_are_rejected(freeze):
    with pytest.raises(ValueError, match='freeze'):
        freeze_labels(_params(), freeze, LAYERS)


def test_num_layers_must_match_the_tree():
    with pytest.raises(ValueError, match='num_layers'):
        freeze_labels(_params(), 'none', LAYERS + 1)


def _sharded(params):
    """`params` on a 2-device mesh: leading axes sharded where they divide, else replicated."""
    mesh = Mesh(np.array(jax.devices()[:2]), ('x',))  # more devices only slow the compile
    return jax.device_put(params, jax.tree.map(
        lambda x: NamedSharding(mesh, PartitionSpec('x' if x.shape[0] % 2 == 0 else None)),
        params))


def test_split_merge_are_inverse_under_jit_and_keep_shardings():
    params, labels = _params(), freeze_labels(_params(), 'layers:1', LAYERS)
    trainable, frozen = split_params(params, labels)
    assert trainable['bert']['embeddings']['LayerNorm']['scale'] is None
    assert frozen['classifier']['kernel'] is None
    assert jax.tree.structure(merge_params(trainable, frozen)) == jax.tree.structure(params)
    sharded = _sharded(params)
    out = jax.jit(lambda p: merge_params(*split_params(p, labels)))(sharded)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(sharded), strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim) and np.array_equal(a, b)


def test_frozen_gradients_are_never_computed():
    params = _params()
    scatters = {}
    for freeze in ('none', 'embeddings'):
        trainable, frozen = split_params(params, freeze_labels(params, freeze, LAYERS))
        jaxpr, grads = jax.make_jaxpr(jax.grad(_loss), return_shape=True)(
            trainable, frozen, BATCH)
        emb = grads['bert']['embeddings']
        assert (emb['word_embeddings']['embedding'] is None) == (freeze == 'embeddings')
        assert grads['bert']['encoder']['layer_0']['output']['dense']['kernel'] is not None
        scatters[freeze] = str(jaxpr).count('scatter-add')
    # An embedding lookup's gradient is a scatter-add: word, position and token-type lookups
    # are not differentiated at all once the embeddings are frozen.
    assert scatters['none'] - scatters['embeddings'] == 3


def _state_owners(opt_state, param_paths) -> collections.Counter:
    """For every non-scalar optimizer-state leaf, the parameter it belongs to."""
    found = collections.Counter()
    for kp, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if np.ndim(leaf):
            path = path_of(kp)
            owner = [p for p in param_paths if path.endswith('/' + p)]
            assert len(owner) == 1, path
            found[owner[0]] += 1
    return found


def test_adamw_steps_freeze_bit_identically_and_store_no_frozen_state():
    params = _params()
    labels = freeze_labels(params, 'encoder', LAYERS)
    tx = make_optimizer(_cfg(weight_decay=0.01, max_grad_norm=1.0), 10, params, labels)
    sharded = _sharded(params)  # sharded arrays in, shardings kept
    state = tx.init(sharded)
    step = _step_fn(tx, labels)
    new = sharded
    for _ in range(3):
        new, state = step(new, state, BATCH)
    for path, before in _flat(sharded).items():
        after = _flat(new)[path]
        assert after.sharding.is_equivalent_to(before.sharding, after.ndim), path
        assert np.array_equal(after, before) == (path in _frozen(labels)), path
    trainable = set(_flat(params)) - _frozen(labels)
    assert _state_owners(state, _flat(params)) == {p: 2 for p in trainable}  # mu and nu
    scalars = [x for x in jax.tree.leaves(state) if np.ndim(x) == 0]
    assert all(x.dtype == jnp.int32 for x in scalars) and len(scalars) == 2  # Adam + schedule
    counts = count_params_by_label(params, labels)
    assert counts == {TRAIN: HEAD, FROZEN: TOTAL - HEAD}
    assert tree_bytes(state) == counts[TRAIN] * 2 * 4 + len(scalars) * 4
    full = make_optimizer(_cfg(), 10, params, freeze_labels(params, 'none', LAYERS))
    full_bytes = tree_bytes(full.init(params))
    assert full_bytes == TOTAL * 2 * 4 + 2 * 4
    assert tree_bytes(state) < 0.1 * full_bytes


def _adam_first_step(g: np.ndarray, lr: float, eps: float = 1e-6) -> np.ndarray:
    return -lr * g / (np.abs(g) + eps)  # bias-corrected moments after one step: g and g**2


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64))
                             for g in jax.tree.leaves(tree))))


def test_clipping_uses_the_trainable_norm_only():
    params = _params()
    labels = freeze_labels(params, 'embeddings', LAYERS)
    tx = make_optimizer(_cfg(max_grad_norm=1e-4), 10, params, labels)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    trainable, frozen = split_params(grads, labels)
    norm, full_norm = _norm(trainable), _norm(grads)
    state = tx.init(params)

    @jax.jit  # one compile for all three
    def variants():  # frozen gradient placeholders: absent, zeros, huge
        return {
            'none': tx.update(trainable, state, split_params(params, labels)[0])[0],
            'zeros': tx.update(merge_params(trainable, jax.tree.map(np.zeros_like, frozen)),
                               state, params)[0],
            'huge': tx.update(merge_params(trainable, jax.tree.map(lambda x: x + 1e6, frozen)),
                              state, params)[0]}
    variants = jax.device_get(variants())
    for path in ('classifier/kernel', 'bert/encoder/layer_1/attention/self/query/kernel'):
        g = _flat(grads)[path]
        # Clipped gradients (~1e-6) are comparable to eps, so the update depends on the norm.
        expected = _adam_first_step(g * (1e-4 / norm), 1e-2)
        for name, updates in variants.items():
            np.testing.assert_allclose(_flat(updates)[path], expected, rtol=2e-5, err_msg=name)
        wrong = _adam_first_step(g * (1e-4 / full_norm), 1e-2)
        assert not np.allclose(_flat(variants['zeros'])[path], wrong, rtol=1e-3)
    assert variants['none']['bert']['embeddings']['word_embeddings']['embedding'] is None
    for path in _frozen(labels):
        assert not np.any(_flat(variants['huge'])[path])  # exact zeros, never the placeholder


def test_layer_decay_and_head_learning_rate():
    params = _params()
    cfg = _cfg(layer_decay=0.5, head_learning_rate=5e-2)
    peaks = _flat(peak_learning_rates(cfg, params))
    expected = {'classifier/kernel': 5e-2, 'bert/pooler/dense/bias': 5e-2,
                'bert/encoder/layer_2/output/dense/kernel': 1e-2 * 0.5,
                'bert/encoder/layer_1/attention/self/key/bias': 1e-2 * 0.25,
                'bert/encoder/layer_0/intermediate/dense/kernel': 1e-2 * 0.125,
                'bert/embeddings/word_embeddings/embedding': 1e-2 * 0.0625,
                'bert/embeddings/LayerNorm/scale': 1e-2 * 0.0625}
    for path, lr in expected.items():
        assert peaks[path] == pytest.approx(lr), path
    # The optimizer applies them: Adam's first step on unit gradients moves each leaf by lr.
    labels = freeze_labels(params, 'none', LAYERS)
    tx = make_optimizer(cfg, 10, params, labels)
    state = tx.init(params)
    updates = jax.jit(lambda: tx.update(jax.tree.map(np.ones_like, params), state, params)[0])()
    for path, update in _flat(updates).items():
        np.testing.assert_allclose(update, -peaks[path], rtol=1e-5, err_msg=path)
    plain = _flat(peak_learning_rates(_cfg(), params))
    assert set(plain.values()) == {1e-2}  # no decay, head_learning_rate 0 = learning_rate


def test_schedule_warms_up_then_decays_to_zero():
    sched = learning_rate_at(_cfg(warmup_fraction=0.1), 100)
    values = [float(sched(s)) for s in (0, 5, 10, 55, 100)]
    np.testing.assert_allclose(values, [0.0, 5e-3, 1e-2, 5e-3, 0.0], atol=1e-9)


def test_l2sp_pulls_pretrained_weights_back_to_the_start():
    params = _params()
    labels = freeze_labels(params, 'embeddings', LAYERS)
    tx = make_optimizer(_cfg(l2sp=1.0, learning_rate=1e-3), 10, params, labels)
    state = tx.init(params)  # p0 = the pretrained weights
    counts = count_params_by_label(params, labels)
    anchored = counts[TRAIN] - HEAD  # p0 is kept for trainable pretrained leaves only
    assert tree_bytes(state) == (2 * counts[TRAIN] + anchored) * 4 + 2 * 4
    moved = jax.tree.map(lambda p: p + 0.05, params)
    no_data = split_params(jax.tree.map(np.zeros_like, params), labels)[0]

    @jax.jit
    def step(p, s):  # zero data gradient: only the penalty acts
        trainable, frozen = split_params(p, labels)
        updates, s = tx.update(no_data, s, trainable)
        return merge_params(optax.apply_updates(trainable, updates), frozen), s
    new = moved
    for _ in range(3):
        new, state = step(new, state)
    for path, start in _flat(params).items():
        before, after = _flat(moved)[path], np.asarray(_flat(new)[path])
        if path.startswith(('classifier/', 'bert/pooler/', 'bert/embeddings/')):
            assert np.array_equal(after, before), path  # head: no anchor; embeddings: frozen
        else:
            assert np.all(np.abs(after - start) < np.abs(before - start) - 2e-3), path


