"""Sharded init and training on 8 fake CPU devices: layouts, and 1-device equivalence."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from engine import mesh as mesh_lib
from models.bert import BertConfig
from tests.sharded import packed_batch, sharded_mlm

SEQ, BATCH, VOCAB = 16, 8, 96


def _setup(mesh_shape, devices=None, dropout=0.1, grad_accum=1):
    model_cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=64, max_position_embeddings=SEQ,
                           dropout_rate=dropout, attention_dropout_rate=dropout)
    return sharded_mlm(model_cfg, mesh_shape, devices, grad_accum)


def _batch():
    return packed_batch(BATCH, SEQ, VOCAB)


def test_parameter_partition_specs_on_a_2x2x2_mesh():
    assert jax.device_count() == 8
    _, _, state, shardings, _ = _setup((2, 2, 2))
    p = shardings.params
    assert p['bert']['embeddings']['word_embeddings']['embedding'].spec == P('tensor', 'fsdp')
    layer = p['bert']['encoder']['layer_0']
    assert layer['attention']['self']['query']['kernel'].spec == P('fsdp', 'tensor')
    assert layer['attention']['output']['dense']['kernel'].spec == P('tensor', 'fsdp')
    assert layer['intermediate']['dense']['kernel'].spec == P('fsdp', 'tensor')
    assert layer['output']['LayerNorm']['scale'].spec == P('fsdp')
    assert p['cls']['predictions']['bias'].spec == P('tensor')
    # Arrays really are laid out that way, and Adam's moments follow their parameters.
    emb = state.params['bert']['embeddings']['word_embeddings']['embedding']
    assert emb.sharding.spec == P('tensor', 'fsdp')
    assert emb.addressable_shards[0].data.shape == (VOCAB // 2, 32 // 2)
    mu = state.opt_state[1][0].mu['bert']['embeddings']['word_embeddings']['embedding']
    assert mu.sharding.spec == P('tensor', 'fsdp')


@functools.cache
def _one_device_run(dropout: float) -> tuple[float, float, list]:
    """(loss_sum, weight_sum, params) after two steps on one device (shared by the cases)."""
    _, mesh1, state1, _, train1 = _setup((1,), devices=jax.devices()[:1], dropout=dropout)
    for _ in range(2):
        state1, m1 = train1(state1, mesh_lib.shard_batch(_batch(), mesh1))
    return (float(m1['loss_sum']), float(m1['weight_sum']),
            jax.tree.leaves(jax.device_get(state1.params)))


@pytest.mark.parametrize('mesh_shape, grad_accum, dropout', [
    ((2, 4), 1, 0.1),
    ((1, 2, 4), 1, 0.1),
    ((4, 2), 2, 0.0),  # accumulation: same masks, summed grads -> same step (no dropout)
])
@pytest.mark.slow
def test_two_steps_on_a_mesh_match_one_device(mesh_shape, grad_accum, dropout):
    loss1, weight1, flat1 = _one_device_run(dropout)
    _, mesh8, state8, _, train8 = _setup(mesh_shape, dropout=dropout, grad_accum=grad_accum)
    for _ in range(2):
        state8, m8 = train8(state8, mesh_lib.shard_batch(_batch(), mesh8))
    np.testing.assert_allclose(loss1, float(m8['loss_sum']), rtol=1e-5)
    assert weight1 == float(m8['weight_sum'])
    flat8 = jax.tree.leaves(jax.device_get(state8.params))
    for a, b in zip(flat1, flat8, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match='needs 6 devices'):
        mesh_lib.resolve_mesh_shape((2, 3), ('data', 'fsdp', 'tensor'), 8)
    assert mesh_lib.resolve_mesh_shape((-1, 2), ('data', 'fsdp', 'tensor'), 8) == (4, 2, 1)
    with pytest.raises(ValueError, match='more dims'):
        mesh_lib.resolve_mesh_shape((1, 1, 1, 8), ('data', 'fsdp', 'tensor'), 8)
