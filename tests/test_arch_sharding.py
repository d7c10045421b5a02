"""A model with every architecture option on, sharded on 8 fake CPU devices: every new
parameter carries logical axes, lays out as its BERT counterpart does, and one training step
on a 2x2x2 mesh matches one device."""


import flax.linen as nn
import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec as P

from engine import mesh as mesh_lib
from models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from tests.sharded import packed_batch, sharded_mlm

SEQ, BATCH, VOCAB = 16, 8, 96
ALL_ON = BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=2,
                    intermediate_size=64, max_position_embeddings=SEQ, dropout_rate=0.0,
                    attention_dropout_rate=0.0, position_embedding='rope', mlp='swiglu',
                    use_bias=False, final_norm=True, local_attention_window=4,
                    global_attention_every=2, pooling='mean', pre_layer_norm=True)


def _setup(mesh_shape, devices=None):
    return sharded_mlm(ALL_ON, mesh_shape, devices)[1:]


def _batch():
    return packed_batch(BATCH, SEQ, VOCAB)


@pytest.mark.parametrize('model_cls', [BertForMaskedLM, BertForSequenceClassification])
def test_every_param_of_the_all_options_model_has_logical_axes(model_cls):
    ids = np.zeros((2, SEQ), np.int32)
    args = (ids, ids[:, :3]) if model_cls is BertForMaskedLM else (ids,)
    boxed = jax.eval_shape(lambda: model_cls(ALL_ON).init(jax.random.key(0), *args))['params']
    flat = flatten_dict(boxed, sep='/')
    allowed = {'batch', 'length', 'embed', 'mlp', 'heads', 'kv', 'vocab', None}
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= allowed, path
    assert not any('position_embeddings' in p for p in flat)


def test_all_options_partition_specs_on_a_2x2x2_mesh():
    assert jax.device_count() == 8
    _, state8, shardings, _ = _setup((2, 2, 2))
    p = shardings.params
    layer = p['bert']['encoder']['layer_1']
    # The 2I-wide gated up projection shards like BERT's intermediate kernel.
    assert layer['intermediate']['dense']['kernel'].spec == P('fsdp', 'tensor')
    assert state8.params['bert']['encoder']['layer_1']['intermediate']['dense'][
        'kernel'].addressable_shards[0].data.shape == (16, 64)  # (32/2, 128/2)
    assert layer['attention']['self']['query']['kernel'].spec == P('fsdp', 'tensor')
    assert layer['output']['dense']['kernel'].spec == P('tensor', 'fsdp')
    assert p['bert']['encoder']['final_layer_norm']['scale'].spec == P('fsdp')
    assert 'bias' not in layer['output']['LayerNorm'] and 'bias' not in layer['output']['dense']
    assert p['cls']['predictions']['bias'].spec == P('tensor')


@pytest.mark.slow
def test_all_options_two_steps_on_a_mesh_match_one_device():
    mesh8, state8, _, train8 = _setup((2, 2, 2))
    mesh1, state1, _, train1 = _setup((1,), devices=jax.devices()[:1])
    for _ in range(2):
        state8, m8 = train8(state8, mesh_lib.shard_batch(_batch(), mesh8))
        state1, m1 = train1(state1, mesh_lib.shard_batch(_batch(), mesh1))
    assert np.isfinite(float(m8['loss_sum'])) and float(m8['weight_sum']) > 0
    np.testing.assert_allclose(float(m8['loss_sum']), float(m1['loss_sum']), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state1.params)),
                    jax.tree.leaves(jax.device_get(state8.params)), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
