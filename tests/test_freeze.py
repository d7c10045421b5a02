"""Freezing and the fine-tuning optimizer: labels, no state and no change for frozen leaves,
clipping over trainable gradients only, learning-rate groups, L2-SP."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from finetune import steps
from finetune.freeze import (
    FROZEN,
    count_params_by_label,
    freeze_labels,
    merge_params,
    path_of,
    split_params,
    tree_bytes,
)
from finetune.optim import _group_scale, group_labels, make_optimizer
from models.bert import BertConfig, BertForSequenceClassification

LAYERS = 3
MODEL = BertForSequenceClassification(BertConfig(
    vocab_size=50, hidden_size=16, num_layers=LAYERS, num_heads=2, intermediate_size=32,
    max_position_embeddings=16, num_labels=3, dropout_rate=0.0, attention_dropout_rate=0.0))


@functools.cache
def _params():
    ids = jnp.ones((1, 8), jnp.int32)
    return jax.device_get(nn.unbox(MODEL.init(jax.random.key(0), ids)['params']))


def _frozen_paths(labels) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    return {path_of(kp) for kp, lab in flat if lab == FROZEN}


def _all_paths() -> set[str]:
    return {path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(_params())[0]}


def _cfg(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        learning_rate=1e-2, head_learning_rate=0.0, warmup_fraction=0.0, weight_decay=0.01,
        layer_decay=1.0, max_grad_norm=1.0, b1=0.9, b2=0.999, eps=1e-6, l2sp=0.0))
    c.update(overrides)
    return c


def test_freeze_modes_select_the_right_paths():
    paths = _all_paths()
    assert _frozen_paths(freeze_labels(_params(), 'none', LAYERS)) == set()
    emb = {p for p in paths if p.startswith('bert/embeddings/')}
    assert _frozen_paths(freeze_labels(_params(), 'embeddings', LAYERS)) == emb
    bottom2 = emb | {p for p in paths if p.startswith(('bert/encoder/layer_0/',
                                                       'bert/encoder/layer_1/'))}
    assert _frozen_paths(freeze_labels(_params(), 'layers:2', LAYERS)) == bottom2
    encoder = {p for p in paths if p.startswith('bert/') and not p.startswith('bert/pooler/')}
    assert _frozen_paths(freeze_labels(_params(), 'encoder', LAYERS)) == encoder
    regex = freeze_labels(_params(), 're:query/kernel$,LayerNorm', LAYERS)
    assert _frozen_paths(regex) == {p for p in paths
                                    if p.endswith('query/kernel') or 'LayerNorm' in p}


@pytest.mark.parametrize('freeze, message', [
    ('everything', 'is not one of'),
    ('layers:9', 'from 0 to 3'),
    ('re:nothing_matches_this', 'matches no parameter'),
    ('re:(', 'bad regex'),
])
def test_bad_freeze_values(freeze, message):
    with pytest.raises(ValueError, match=message):
        freeze_labels(_params(), freeze, LAYERS)


def test_split_and_merge_are_inverse():
    labels = freeze_labels(_params(), 'layers:1', LAYERS)
    trainable, frozen = split_params(_params(), labels)
    assert 'embeddings' not in trainable['bert'] and 'classifier' not in frozen
    merged = merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(_params())


def _train(freeze: str, cfg, num_steps: int = 3):
    params = _params()
    labels = freeze_labels(params, freeze, LAYERS)
    tx = make_optimizer(cfg, params, labels, 10, LAYERS)
    state = steps.FinetuneState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params))
    step = jax.jit(functools.partial(steps.train_step, model=MODEL, tx=tx, labels=labels,
                                     schedule=lambda s: cfg.learning_rate, task='classification',
                                     seed=0))
    rng = np.random.default_rng(0)
    batch = {'input_ids': rng.integers(5, 50, (8, 8)).astype(np.int32),
             'token_type_ids': np.zeros((8, 8), np.int32),
             'attention_mask': np.ones((8, 8), np.int32),
             'labels': rng.integers(0, 3, 8).astype(np.int32)}
    for _ in range(num_steps):
        state, metrics = step(state, batch)
    return params, labels, state, metrics


def test_frozen_leaves_are_bit_identical_and_hold_no_optimizer_state():
    start, labels, state, _ = _train('encoder', _cfg())
    before, after = jax.tree.leaves(start), jax.tree.leaves(jax.device_get(state.params))
    for b, a, lab in zip(before, after, jax.tree.leaves(labels), strict=True):
        if lab == FROZEN:
            assert np.array_equal(a, b) and a.dtype == b.dtype
        else:
            assert not np.array_equal(a, b)
    counts = count_params_by_label(start, labels)
    # Adam's two fp32 moments for trainable leaves only, plus int32 step counters.
    counters = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state)
                   if x.ndim == 0)
    assert tree_bytes(state.opt_state) == 2 * 4 * counts['train'] + counters
    full = _train('none', _cfg(), num_steps=1)[2]
    assert tree_bytes(state.opt_state) < 0.1 * tree_bytes(full.opt_state)


def test_clipping_uses_the_trainable_norm_only():
    """Frozen gradients, however large, change nothing: not the norm, not any update."""
    params = _params()
    labels = freeze_labels(params, 'embeddings', LAYERS)
    tx = make_optimizer(_cfg(max_grad_norm=1e-3), params, labels, 10, LAYERS)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    trainable, frozen = split_params(grads, labels)
    quiet = merge_params(trainable, jax.tree.map(np.zeros_like, frozen))
    loud = merge_params(trainable, jax.tree.map(lambda x: 1e6 * np.ones_like(x), frozen))
    state = tx.init(params)
    for a, b in zip(jax.tree.leaves(tx.update(quiet, state, params)[0]),
                    jax.tree.leaves(tx.update(loud, state, params)[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    # And clipping is active: an unclipped optimizer moves the same leaf differently.
    unclipped = make_optimizer(_cfg(max_grad_norm=0.0), params, labels, 10, LAYERS)
    a = tx.update(quiet, state, params)[0]['classifier']['kernel']
    b = unclipped.update(quiet, unclipped.init(params), params)[0]['classifier']['kernel']
    assert not np.allclose(a, b)


def test_layer_decay_and_head_learning_rate_groups():
    params = _params()
    labels = freeze_labels(params, 'none', LAYERS)
    cfg = _cfg(layer_decay=0.5, head_learning_rate=5e-2)
    groups = group_labels(params, labels, cfg, LAYERS)
    assert groups['classifier']['kernel'] == 'head' and groups['bert']['pooler']['dense'][
        'kernel'] == 'head'
    assert groups['bert']['embeddings']['word_embeddings']['embedding'] == 'embeddings'
    assert groups['bert']['encoder']['layer_2']['output']['dense']['kernel'] == 'layer_2'
    assert _group_scale('layer_2', cfg, LAYERS) == 0.5  # the top layer: one decay step
    assert _group_scale('layer_0', cfg, LAYERS) == 0.125
    assert _group_scale('embeddings', cfg, LAYERS) == 0.0625
    assert _group_scale('head', cfg, LAYERS) == 5.0


def test_l2sp_pulls_toward_the_pretrained_weights():
    params = _params()
    labels = freeze_labels(params, 'none', LAYERS)
    tx = make_optimizer(_cfg(l2sp=1.0, weight_decay=0.0, max_grad_norm=0.0), params,
                        labels, 10, LAYERS)
    state = tx.init(params)
    moved = jax.tree.map(lambda p: p + 0.5, params)  # away from p0, zero data gradient
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), state, moved)
    kernel = updates['bert']['encoder']['layer_0']['intermediate']['dense']['kernel']
    assert np.all(np.asarray(kernel) < 0)  # pulled back toward p0
    head = updates['classifier']['kernel']  # the new head is not pulled
    np.testing.assert_array_equal(np.asarray(head), 0.0)
