"""engine.step: the one train step - accumulation and frozen parameters for both stages."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine.step import FROZEN, TRAIN, TrainState, train_step
from finetune.steps import classifier_train_step
from models.bert import BertConfig, BertForSequenceClassification

CFG = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                 max_position_embeddings=16, dropout_rate=0.0, attention_dropout_rate=0.0,
                 num_labels=3)


def _batch(rows=8, seq=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 50, size=(rows, seq)).astype(np.int32)
    return {'input_ids': ids, 'token_type_ids': np.zeros_like(ids),
            'attention_mask': np.ones_like(ids),
            'labels': rng.integers(0, 3, rows).astype(np.int32)}


def _state(tx):
    model = BertForSequenceClassification(CFG)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))['params'])
    return model, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params))


def _labels(params):
    # The embeddings frozen, everything else trains.
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: FROZEN if 'embeddings' in jax.tree_util.keystr(kp) else TRAIN, params)


def test_classifier_accumulation_matches_one_big_batch_and_frozen_stays_bit_identical():
    tx = optax.sgd(0.5)
    model, state = _state(tx)
    labels = _labels(state.params)
    results = {}
    for count in (1, 2, 4):
        step = jax.jit(classifier_train_step(model=model, tx=tx, labels=labels,
                                             schedule=lambda s: 0.5, task='classification',
                                             seed=0, grad_accum_steps=count))
        results[count] = step(state, _batch())
    one_params, one_metrics = results[1]
    for count in (2, 4):
        params, metrics = results[count]
        np.testing.assert_allclose(metrics['loss_sum'], one_metrics['loss_sum'], rtol=1e-5)
        np.testing.assert_allclose(metrics['grad_norm'], one_metrics['grad_norm'], rtol=1e-4)
        for a, b in zip(jax.tree.leaves(params.params), jax.tree.leaves(one_params.params),
                        strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    frozen_before = state.params['bert']['embeddings']
    for params, _ in results.values():
        for a, b in zip(jax.tree.leaves(params.params['bert']['embeddings']),
                        jax.tree.leaves(frozen_before), strict=True):
            np.testing.assert_array_equal(a, b)
    changed = params.params['classifier']['kernel'] != state.params['classifier']['kernel']
    assert bool(changed.any())


def test_per_weight_objectives_divide_by_the_total_weight_not_per_micro_batch():
    # A per-item sum whose micro-batches carry unequal weights: the mean over all items,
    # not the mean of the micro-batch means.
    def loss_fn(params, batch, rng):
        del rng
        errors = (params['w'] * batch['x'] - batch['y']) ** 2 * batch['weight']
        terms = {'loss_sum': errors.sum(), 'weight_sum': batch['weight'].sum()}
        return terms['loss_sum'], terms

    x = jnp.arange(1.0, 9.0)
    batch = {'x': x, 'y': 2 * x, 'weight': jnp.array([1., 1., 1., 1., 1., 0., 0., 0.])}
    tx = optax.sgd(1.0)
    state = TrainState(step=jnp.zeros((), jnp.int32), params={'w': jnp.array(0.0)},
                       opt_state=tx.init({'w': jnp.array(0.0)}))
    expected = -(2 * (0.0 * x - 2 * x) * x * batch['weight']).sum() / 5.0
    for count in (1, 2, 4):
        new, metrics = train_step(state, batch, loss_fn=loss_fn, tx=tx, schedule=lambda s: 1.0,
                                  seed=0, grad_accum_steps=count, per_weight=True)
        np.testing.assert_allclose(new.params['w'], expected, rtol=1e-6)
        assert float(metrics['weight_sum']) == 5.0
