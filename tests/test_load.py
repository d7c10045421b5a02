"""models.load: a pretrained encoder into a fresh model; what stays fresh is explicit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.checkpoint import Checkpoints, subtree_reader
from engine.step import TrainState
from models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from models.load import load
from models.peft import is_peft_path

BASE = dict(vocab_size=40, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=32,
            max_position_embeddings=16)


def _init(model, seed):
    ids = jnp.zeros((1, 8), jnp.int32)
    args = (ids, jnp.zeros((1, 1), jnp.int32)) if isinstance(model, BertForMaskedLM) else (ids,)
    return nn.unbox(model.init(jax.random.key(seed), *args)['params'])


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    params = _init(BertForMaskedLM(BertConfig(**BASE)), 0)
    directory = str(tmp_path_factory.mktemp('pre') / 'checkpoints')
    ckpts = Checkpoints(directory, keep=1, async_save=False)
    ckpts.save(7, TrainState(step=jnp.array(7), params=params, opt_state={}), {})
    ckpts.close()
    return directory, params


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                      strict=True))


def test_the_encoder_is_loaded_and_new_parameters_stay_as_initialised(saved):
    directory, pre = saved
    model = BertForSequenceClassification(BertConfig(**BASE, num_labels=3, lora_rank=2,
                                                     lora_targets=('query',)))
    fresh = _init(model, 1)
    out = load(fresh, subtree_reader(directory, None), dont_load=is_peft_path)
    assert _equal(out['bert']['embeddings'], pre['bert']['embeddings'])
    query = out['bert']['encoder']['layer_2']['attention']['self']['query']
    saved_query = pre['bert']['encoder']['layer_2']['attention']['self']['query']
    assert np.array_equal(query['kernel'], saved_query['kernel'])
    fresh_query = fresh['bert']['encoder']['layer_2']['attention']['self']['query']
    for name in ('lora_a', 'lora_b'):  # not in the checkpoint: kept, not zeroed or read
        assert np.array_equal(query[name], fresh_query[name])
    assert _equal(out['classifier'], fresh['classifier'])  # the head: not a loaded part
    assert _equal(out['bert']['pooler'], fresh['bert']['pooler'])


def test_layer_map_reads_each_layer_from_its_source(saved):
    directory, pre = saved
    student = _init(BertForSequenceClassification(
        BertConfig(**{**BASE, 'num_layers': 2}, num_labels=2)), 1)
    out = load(student, subtree_reader(directory, 7), layer_map={'layer_1': 'layer_2'})
    layers = out['bert']['encoder']
    assert set(layers) == {'layer_0', 'layer_1'}
    assert _equal(layers['layer_0'], pre['bert']['encoder']['layer_0'])
    assert _equal(layers['layer_1'], pre['bert']['encoder']['layer_2'])


# orbax abandons the reads of a refused restore in the background; they end noisily.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_another_architecture_is_refused(saved):
    directory, _ = saved
    wide = _init(BertForSequenceClassification(
        BertConfig(**{**BASE, 'hidden_size': 32}, num_labels=2)), 1)
    with pytest.raises(ValueError):
        load(wide, subtree_reader(directory, None))
