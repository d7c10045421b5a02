"""Parameter-efficient fine-tuning: LoRA and adapters start as the base model, prefixes are
attended to as extra keys/values; all train only their own params (plus the head) with
optimizer state for those only, and LoRA merges."""

import dataclasses
import functools
import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import launch
from configs.finetune import get_config
from engine import mesh as mesh_lib
from engine.checkpoint import read_state_numpy
from engine.errors import ConfigError
from engine.step import FROZEN, TRAIN
from finetune import encoding, setup, unfreeze
from finetune import peft as ft_peft
from finetune.freeze import tree_bytes
from models import peft
from models.bert import BertConfig, BertForSequenceClassification
from models.paths import is_head, path_of
from tests.test_finetune_e2e import finetune_args, task_files  # noqa: F401  (a fixture)

BASE = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2,
                  intermediate_size=64, max_position_embeddings=32, dropout_rate=0.0,
                  attention_dropout_rate=0.0)
ALL = ('query', 'key', 'value', 'attention_output', 'intermediate', 'output')
LORA = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
ADAPTER = dataclasses.replace(BASE, adapter_size=8)
PREFIX = dataclasses.replace(BASE, prefix_length=3)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 100, (4, 16)))
MASK = jnp.asarray(np.arange(16)[None, :] < np.array([[16], [9], [12], [3]]), jnp.int32)


@functools.cache
def _init(config: BertConfig) -> dict:
    model = BertForSequenceClassification(config)
    return jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), IDS)['params']))()


@functools.cache
def _apply(config: BertConfig):
    model = BertForSequenceClassification(config)
    return jax.jit(lambda p: model.apply({'params': p}, IDS, attention_mask=MASK))


def _logits(config: BertConfig, params: dict) -> np.ndarray:
    return np.asarray(_apply(config)(params))  # compiled once per config


def _paths(tree) -> list[str]:
    return [path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize('config', [LORA, ADAPTER])
def test_step_zero_is_the_base_model_with_the_base_names(config):
    plain = BASE
    base, adapted = _init(plain), _init(config)
    # Same names and values for every base parameter: pretrained checkpoints restore as is.
    assert _same(peft.without_peft(adapted), base)
    extra = [p for p in _paths(adapted) if peft.is_peft_path(p)]
    assert extra and all(p.startswith('bert/encoder/layer_') for p in extra)
    # Equal up to XLA fusing the two (different) graphs differently.
    np.testing.assert_allclose(_logits(config, adapted), _logits(plain, base), rtol=1e-6,
                               atol=1e-8)


def test_lora_targets_by_name_and_regex():
    config = dataclasses.replace(LORA, lora_targets=('query', r'layer_1/output/dense$'))
    params = _init(config)
    adapted = sorted({p.rsplit('/', 1)[0] for p in _paths(params) if p.endswith('lora_a')})
    assert adapted == ['bert/encoder/layer_0/attention/self/query',
                       'bert/encoder/layer_1/attention/self/query',
                       'bert/encoder/layer_1/output/dense']
    lora_a = params['bert']['encoder']['layer_1']['output']['dense']['lora_a']
    assert lora_a.shape == (64, 4) and np.abs(lora_a).max() > 0
    ft_peft.check_targets(params, config.lora_targets)
    with pytest.raises(ConfigError, match='qeury'):
        ft_peft.check_targets(params, ('qeury',))
    pfeiffer = _init(dataclasses.replace(BASE, adapter_size=8, adapter_placement='pfeiffer'))
    assert {p.split('/adapter/')[0] for p in _paths(pfeiffer) if '/adapter/' in p} == {
        'bert/encoder/layer_0/output', 'bert/encoder/layer_1/output'}


@pytest.mark.slow
def test_prefix_attention_matches_a_hand_computation_and_ignores_padding():
    from models.bert import BertSelfAttention, make_attention_mask
    x = np.random.default_rng(2).normal(size=(4, 16, 32)).astype(np.float32)
    mask = make_attention_mask(MASK)
    module = BertSelfAttention(PREFIX)
    params = nn.unbox(module.init(jax.random.key(1), x, mask, True)['params'])
    assert params['prefix']['key'].shape == params['prefix']['value'].shape == (3, 2, 16)
    out = np.asarray(module.apply({'params': params}, x, mask, True))

    def heads(name):  # (B, L, heads, head_dim)
        return (x @ params[name]['kernel'] + params[name]['bias']).reshape(4, 16, 2, 16)
    prefix = {n: np.broadcast_to(params['prefix'][n], (4, 3, 2, 16)) for n in ('key', 'value')}
    k = np.concatenate([prefix['key'], heads('key')], 1)
    v = np.concatenate([prefix['value'], heads('value')], 1)
    scores = np.einsum('bqhd,bkhd->bhqk', heads('query'), k) / 4.0
    visible = np.concatenate([np.ones((4, 1, 1, 3), bool), np.asarray(MASK, bool)[:, None, None]],
                             -1)
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum('bhqk,bkhd->bqhd', weights, v).reshape(4, 16, 32)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    # The whole model: base names unchanged, padded token ids change nothing.
    prefixed = _init(PREFIX)
    assert jax.tree.structure(peft.without_peft(prefixed)) == jax.tree.structure(_init(BASE))
    other_pad = jnp.where(MASK == 1, IDS, 7)
    model = BertForSequenceClassification(PREFIX)
    np.testing.assert_allclose(
        model.apply({'params': prefixed}, other_pad, attention_mask=MASK),
        _logits(PREFIX, prefixed), rtol=1e-6, atol=1e-7)


def test_merged_lora_is_a_plain_model_with_the_same_logits():
    rng = np.random.default_rng(1)

    def trained(path: str, x):  # non-zero B, as after training; O(1) logits
        if path.endswith('lora_b'):
            return rng.normal(0, 0.3, x.shape).astype(np.float32)
        return x * 50 if path == 'classifier/kernel' else x
    params = jax.tree_util.tree_map_with_path(lambda kp, x: trained(path_of(kp), x),
                                              _init(LORA))
    merged = peft.merge_lora(params, LORA)
    plain = peft.merged_config(LORA)
    assert plain.lora_rank == 0 and _paths(merged) == _paths(_init(plain))
    lora_logits, merged_logits = _logits(LORA, params), _logits(plain, merged)
    assert np.abs(lora_logits).max() > 0.3
    assert np.abs(lora_logits - _logits(BASE, peft.without_peft(params))).max() > 0.1
    np.testing.assert_allclose(merged_logits, lora_logits, atol=1e-5, rtol=1e-5)


def _finetune_cfg(method: str, *extra: tuple[str, object]):
    cfg = get_config('custom')
    cfg.init_from, cfg.seq_len, cfg.batch_size, cfg.learning_rate = 'none', 16, 8, 1e-2
    cfg.mesh.shape = (2, 2, 2)  # data, fsdp, tensor: LoRA/adapter params get sharded too
    for key in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size'):
        cfg.model[key] = getattr(BASE, key)
    cfg.peft.method, cfg.peft.rank, cfg.peft.adapter_size = method, 4, 8
    for key, value in extra:
        cfg.peft[key] = value
    return cfg


def _trains(path: str, norms: bool) -> bool:
    return peft.is_peft_path(path) or is_head(path) or (norms and '/LayerNorm/' in path)


@pytest.mark.parametrize('method,norms', [('lora', False), ('adapter', True),
                                          ('prefix', False)])
@pytest.mark.slow
def test_only_peft_and_head_params_train_and_hold_optimizer_state(method, norms):
    cfg = _finetune_cfg(method, ('train_layer_norm', norms), ('prefix_length', 4))
    mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    built = setup.build(cfg, {'label_names': ['a', 'b']}, types.SimpleNamespace(vocab_size=100))
    phase = unfreeze.phase_of_state(0, cfg.gradual_unfreeze_steps, BASE.num_layers)
    state, labels, tx, schedule = setup.initial_state(cfg, mesh, built, 10, phase)
    paths, flat_labels = _paths(labels), jax.tree.leaves(labels)
    assert flat_labels == [TRAIN if _trains(p, norms) else FROZEN for p in paths]
    start = jax.tree.map(np.asarray, state.params)
    train, _ = setup.compile_steps(cfg, mesh, built, tx, labels, schedule, state)
    rng = np.random.default_rng(0)
    batch = {'input_ids': rng.integers(0, 100, (8, 16)), 'token_type_ids': np.zeros((8, 16)),
             'attention_mask': np.ones((8, 16)), 'labels': rng.integers(0, 2, 8)}
    batch = {k: v.astype(np.int32) for k, v in batch.items()}
    with setup.sharding_context(mesh, cfg):
        for _ in range(3):
            state, _ = train(state, mesh_lib.shard_batch(batch, mesh))
    for path, label, before, after in zip(paths, flat_labels, jax.tree.leaves(start),
                                          jax.tree.leaves(state.params), strict=True):
        changed = not np.array_equal(before, np.asarray(after))
        assert changed == (label == TRAIN), path  # frozen: bit-identical; trainable: moved
    trainable = sum(int(np.prod(x.shape)) for x, label in
                    zip(jax.tree.leaves(start), flat_labels, strict=True) if label == TRAIN)
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sum(x.size for x in moments) == 2 * trainable  # Adam mu and nu, trainable only
    assert 2 * 4 * trainable <= tree_bytes(state.opt_state) <= 2 * 4 * trainable + 64
    total = sum(x.size for x in jax.tree.leaves(start))
    assert trainable < total / 4


def test_bad_peft_configs_are_one_line_errors():
    with pytest.raises(ConfigError, match='peft.method'):
        ft_peft.model_fields(_finetune_cfg('bitfit'))
    with pytest.raises(ConfigError, match='peft.prefix_length'):
        ft_peft.model_fields(_finetune_cfg('prefix', ('prefix_length', 0)))
    with pytest.raises(ConfigError, match='peft.rank'):
        ft_peft.model_fields(_finetune_cfg('lora', ('rank', 0)))
    with pytest.raises(ConfigError, match='peft.adapter_placement'):
        ft_peft.model_fields(_finetune_cfg('adapter', ('adapter_placement', 'middle')))
    assert ft_peft.model_fields(_finetune_cfg('none')) == {}


@pytest.mark.slow
def test_lora_finetune_end_to_end_then_merged_predict(tmp_path, pretrained_run,
                                                      task_files):  # noqa: F811
    pre, ft = pretrained_run, tmp_path / 'ft'
    args = finetune_args(pre, task_files, '--config.peft.method=lora', '--config.peft.rank=8',
                         '--config.learning_rate=1e-2', '--config.num_epochs=4')
    assert launch.main(['finetune', '--workdir', str(ft), *args]) == 0
    results = json.loads((ft / 'results.json').read_text())
    assert results['test']['accuracy'] > 0.75, results  # two balanced-ish classes
    config = BertConfig(**json.loads((ft / 'model.json').read_text()))
    assert config.lora_rank == 8 and config.lora_targets == ALL
    params = read_state_numpy(str(ft / 'best'))['params']
    assert any(p.endswith('lora_b') for p in _paths(params))

    texts = tmp_path / 'new.txt'
    texts.write_text('the red dog ran near the house .\nthe blue fish sat on the tree .\n')
    out = tmp_path / 'predictions.jsonl'
    argv = ['predict', '--workdir', str(ft), '--input', str(texts), '--output', str(out)]
    assert launch.main(argv) == 0
    merged = [json.loads(line)['probabilities'] for line in out.read_text().splitlines()]
    # The unmerged LoRA model on the same inputs gives the same probabilities.
    from finetune import data, predict
    from text.tokenizer import Tokenizer
    examples = data.Examples(text_a=texts.read_text().splitlines(), text_b=None,
                             labels=np.zeros(2, np.int32))
    encoded = encoding.encode(Tokenizer(str(ft / 'spm.model')), examples, 16)
    probs = predict.predict(BertForSequenceClassification(config), params, encoded,
                            'classification')
    names = results['label_names']
    np.testing.assert_allclose([[m[n] for n in names] for m in merged], probs, atol=2e-6)
