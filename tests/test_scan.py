"""scan_layers: one nn.scan over identical layers computes what the unrolled layers do; its
stacked params shard like theirs (plus an unsharded layer axis) and unroll for fine-tuning
and export."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import launch
from engine import mesh as mesh_lib
from engine.checkpoint import Checkpoints, subtree_reader
from engine.step import TrainState
from models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from models.load import load
from models.scan import SCANNED_NAME, stack_layers, unstack_layers
from tests.helpers import REPO, tiny_args, write_toy_task
from tests.sharded import packed_batch, sharded_mlm

SEQ, VOCAB = 16, 96
BASE = BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=2,
                  intermediate_size=64, max_position_embeddings=SEQ, dropout_rate=0.0,
                  attention_dropout_rate=0.0)


def _init(model, seed=0):
    ids = jnp.zeros((1, SEQ), jnp.int32)
    args = (ids, ids[:, :2]) if isinstance(model, BertForMaskedLM) else (ids,)
    return nn.unbox(model.init(jax.random.key(seed), *args)['params'])


def _with_encoder(params, encoder):
    return {**params, 'bert': {**params['bert'], 'encoder': encoder}}


@pytest.mark.parametrize('options', [
    {}, {'remat': 'full'}, {'pre_layer_norm': True},
    {'local_attention_window': 4, 'global_attention_every': 2, 'position_embedding': 'rope',
     'mlp': 'swiglu', 'use_bias': False},
    {'local_attention_window': 4, 'global_attention_every': 2, 'position_embedding': 'rope',
     'rope_theta': 160000.0, 'local_rope_theta': 10.0}])
def test_scanned_layers_compute_what_unrolled_layers_do(options):
    unrolled = dataclasses.replace(BASE, **options)
    scanned = dataclasses.replace(unrolled, scan_layers=True)
    params = _init(BertForMaskedLM(unrolled))
    stacked = _with_encoder(params, stack_layers(params['bert']['encoder']))
    # The scanned model's own init has exactly this tree (layers stacked on axis 0).
    assert (jax.tree.map(jnp.shape, _init(BertForMaskedLM(scanned)))
            == jax.tree.map(jnp.shape, stacked))
    assert jax.tree.leaves(stacked['bert']['encoder'][SCANNED_NAME])[0].shape[0] == 3
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, VOCAB, (4, SEQ)))
    ids = ids.at[1, 10:].set(0)
    positions = jnp.asarray(rng.integers(1, SEQ, (4, 3)))
    mask = (ids != 0).astype(jnp.int32)
    a = BertForMaskedLM(unrolled).apply({'params': params}, ids, positions, attention_mask=mask)
    b = BertForMaskedLM(scanned).apply({'params': stacked}, ids, positions, attention_mask=mask)
    np.testing.assert_allclose(a, b, atol=2e-5)
    back = unstack_layers(stacked['bert']['encoder'])
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params['bert']['encoder']),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def test_scanned_params_shard_like_unrolled_ones_on_a_2x2x2_mesh():
    assert jax.device_count() == 8
    _, mesh, state, shardings, train = sharded_mlm(
        dataclasses.replace(BASE, scan_layers=True), (2, 2, 2))
    layers = shardings.params['bert']['encoder'][SCANNED_NAME]
    assert layers['attention']['self']['query']['kernel'].spec == P(None, 'fsdp', 'tensor')
    assert layers['intermediate']['dense']['kernel'].spec == P(None, 'fsdp', 'tensor')
    assert layers['output']['LayerNorm']['scale'].spec == P(None, 'fsdp')
    state, metrics = train(state, mesh_lib.shard_batch(packed_batch(8, SEQ, VOCAB), mesh))
    assert np.isfinite(float(metrics['loss_sum']))


def test_a_scanned_checkpoint_loads_into_unrolled_layers(tmp_path):
    scanned = dataclasses.replace(BASE, scan_layers=True)
    saved = _init(BertForMaskedLM(scanned))
    ckpts = Checkpoints(str(tmp_path / 'checkpoints'), keep=1, async_save=False)
    ckpts.save(3, TrainState(step=jnp.array(3), params=saved, opt_state={}), {})
    ckpts.close()
    fresh = _init(BertForSequenceClassification(dataclasses.replace(BASE, num_labels=2)), 1)
    out = load(fresh, subtree_reader(str(tmp_path / 'checkpoints'), None), saved_layers=3)
    expected = unstack_layers(saved['bert']['encoder'])
    assert set(out['bert']['encoder']) == set(expected)
    for x, y in zip(jax.tree.leaves(out['bert']['encoder']), jax.tree.leaves(expected),
                    strict=True):
        np.testing.assert_array_equal(x, y)
    # A 2-layer student reading layers 0 and 2 of the scanned stack.
    student = _init(BertForSequenceClassification(
        dataclasses.replace(BASE, num_layers=2, num_labels=2)), 1)
    out = load(student, subtree_reader(str(tmp_path / 'checkpoints'), 3),
               layer_map={'layer_1': 'layer_2'}, saved_layers=3)
    np.testing.assert_array_equal(
        out['bert']['encoder']['layer_1']['output']['dense']['kernel'],
        expected['layer_2']['output']['dense']['kernel'])


@pytest.mark.slow
def test_scanned_pretraining_fine_tunes_and_exports(tmp_path, corpus):
    pre = tmp_path / 'pre'
    assert launch.main(['pretrain', '--workdir', str(pre), *tiny_args(corpus, 4),
                        '--config.model.scan_layers=True']) == 0
    task = write_toy_task(tmp_path, n=64)
    assert launch.main(['finetune', '--workdir', str(tmp_path / 'ft'), '--config',
                        f'{REPO}/configs/finetune.py:custom', f'--config.init_from={pre}',
                        f'--config.data.train_file={task}', '--config.num_epochs=1',
                        '--config.batch_size=16', '--config.seq_len=16',
                        '--config.freeze=layers:1', '--config.model.pooling=cls']) == 0
    # export unrolls the layers and checks its logits against ours (convert/verify.py).
    assert launch.main(['export', '--workdir', str(pre), '--output', str(tmp_path / 'hf')]) == 0
    assert (tmp_path / 'hf' / 'model.safetensors').is_file()
