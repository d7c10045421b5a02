"""The precision policy: model.param_dtype (what the weights are stored in), Adam's
mu_dtype (its first moment), and fine-tuning's own compute dtype and remat."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.finetune import get_config as finetune_config
from configs.pretrain import get_config as pretrain_config
from engine import mesh as mesh_lib
from engine import resume_check
from engine.config_cli import config_to_json
from engine.errors import ConfigError
from engine.optim import OptimizerConfig, make_optimizer
from engine.rundir import RunDir
from engine.step import FROZEN, TRAIN
from finetune import setup
from pretrain import sections
from pretrain import state as state_lib


def _params():
    keys = jax.random.split(jax.random.key(0), 2)
    return {'dense': {'kernel': jax.random.normal(keys[0], (16, 8)),
                      'bias': jax.random.normal(keys[1], (8,))}}


def _leaves_named(tree, name: str) -> list:
    found = []
    def visit(path, leaf):
        if any(getattr(k, 'name', None) == name for k in path):
            found.append(leaf)
    jax.tree_util.tree_map_with_path(visit, tree)
    return found


@pytest.mark.parametrize('labels', [None, {'dense': {'kernel': TRAIN, 'bias': FROZEN}}])
def test_bf16_first_moment_halves_it_and_keeps_the_step(labels):
    params = _params()
    grads = jax.tree.map(lambda x: 0.1 * jnp.cos(x), params)
    plain = OptimizerConfig(learning_rate=1e-2, warmup_fraction=0.0, mu_dtype='')
    half = OptimizerConfig(learning_rate=1e-2, warmup_fraction=0.0, mu_dtype='bfloat16')
    tx_plain, tx_half = (make_optimizer(c, 10, params, labels) for c in (plain, half))
    s_plain, s_half = tx_plain.init(params), tx_half.init(params)
    mus, nus = _leaves_named(s_half, 'mu'), _leaves_named(s_half, 'nu')
    assert mus and all(m.dtype == jnp.bfloat16 for m in mus)
    assert nus and all(n.dtype == jnp.float32 for n in nus)  # the second moment keeps f32
    assert all(m.dtype == jnp.float32 for m in _leaves_named(s_plain, 'mu'))
    for _ in range(3):
        u_plain, s_plain = tx_plain.update(grads, s_plain, params)
        u_half, s_half = tx_half.update(grads, s_half, params)
        np.testing.assert_allclose(u_half['dense']['kernel'], u_plain['dense']['kernel'],
                                   rtol=2e-2, atol=1e-6)  # bf16's 8 bits of mantissa


def test_lamb_with_a_mu_dtype_is_one_config_error():
    with pytest.raises(ConfigError, match="^optimizer.mu_dtype: optax's LAMB"):
        OptimizerConfig(name='lamb', mu_dtype='bfloat16', prefix='optimizer.')
    with pytest.raises(ConfigError, match="optimizer.mu_dtype: 'fp8' is not one of"):
        OptimizerConfig.from_config({'mu_dtype': 'fp8'})


def _state_bytes(overrides: dict) -> dict:
    cfg = pretrain_config('tiny')
    for key, value in overrides.items():
        section, _, leaf = key.rpartition('.')
        (cfg[section] if section else cfg)[leaf] = value
    mesh = mesh_lib.make_mesh((1, 1), cfg.mesh.axes, devices=jax.devices()[:1])
    built = state_lib.build(sections.step_spec(cfg), mesh)
    sizes = jax.tree.map(  # the floating leaves (not the step counters)
        lambda x: x.size * x.dtype.itemsize if jnp.issubdtype(x.dtype, jnp.floating) else 0,
        built.abstract)
    return {'params': sum(jax.tree.leaves(sizes.params)),
            'opt_state': sum(jax.tree.leaves(sizes.opt_state)),
            'dtypes': {x.dtype for x in jax.tree.leaves(built.abstract.params)}}


def test_the_state_a_run_builds_follows_the_policy():
    base = _state_bytes({})
    weights = _state_bytes({'model.param_dtype': 'bfloat16'})
    moments = _state_bytes({'optimizer.mu_dtype': 'bfloat16'})
    assert base['dtypes'] == {jnp.dtype('float32')}
    assert weights['dtypes'] == {jnp.dtype('bfloat16')}
    assert weights['params'] * 2 == base['params']
    assert weights['opt_state'] * 2 == base['opt_state']  # both moments follow the params
    assert moments['params'] == base['params']
    assert moments['opt_state'] * 4 == base['opt_state'] * 3  # mu halved, nu kept


def test_bad_param_dtype_is_one_config_error():
    cfg = pretrain_config('tiny')
    cfg.model.param_dtype = 'float16'
    with pytest.raises(ConfigError, match='^model: param_dtype must be one of'):
        sections.bert_config(cfg)


def test_finetuning_computes_in_its_own_dtype_and_remat(tmp_path):
    pretrained = pretrain_config('tiny')  # float32, no remat
    RunDir(tmp_path).write_config(pretrained.to_dict())
    cfg = finetune_config('custom')
    cfg.init_from = str(tmp_path)
    cfg.model.dtype, cfg.model.remat, cfg.model.hidden_size = 'bfloat16', 'full', 64
    task = {'label_names': ['a', 'b']}
    built = setup.build(cfg, task, types.SimpleNamespace(vocab_size=100))
    assert (built.model_cfg.dtype, built.model_cfg.remat) == ('bfloat16', 'full')
    assert built.model_cfg.hidden_size == pretrained.model.hidden_size  # architecture: its


def test_workdirs_from_before_the_new_keys_still_resume(tmp_path):
    cfg = pretrain_config('tiny')
    old = json.loads(config_to_json(cfg))
    del old['data']['text_field'], old['model']['param_dtype'], old['optimizer']['mu_dtype']
    (tmp_path / 'config.json').write_text(json.dumps(old))
    (RunDir(tmp_path).checkpoints / '5').mkdir(parents=True)
    assert resume_check.check_pretrain(cfg.to_dict(), tmp_path) == old
    cfg.optimizer.mu_dtype = 'bfloat16'  # what the old run did not do: refused
    with pytest.raises(ConfigError, match='^optimizer.mu_dtype: the run in .* with "",'):
        resume_check.check_pretrain(cfg.to_dict(), tmp_path)


@pytest.mark.slow
def test_bf16_weights_train_checkpoint_and_export_as_float32(tmp_path, corpus):
    import launch
    from engine.checkpoint import read_state_numpy
    from tests.helpers import read_metrics, tiny_args
    workdir = tmp_path / 'run'
    args = tiny_args(corpus, 6, '--config.model.param_dtype=bfloat16',
                     '--config.optimizer.mu_dtype=bfloat16')
    assert launch.main(['pretrain', '--workdir', str(workdir), *args]) == 0
    losses = [r['loss'] for r in read_metrics(workdir) if 'loss' in r]
    assert losses and all(np.isfinite(losses))
    saved = read_state_numpy(str(RunDir(workdir).checkpoints))
    assert {x.dtype for x in jax.tree.leaves(saved['params'])} == {jnp.dtype('bfloat16')}
    out = tmp_path / 'hf'
    assert launch.main(['export', '--workdir', str(workdir), '--output', str(out)]) == 0
    from safetensors.numpy import load_file
    tensors = load_file(str(out / 'model.safetensors'))
    assert {t.dtype for t in tensors.values()} == {np.dtype('float32')}
    word = saved['params']['bert']['embeddings']['word_embeddings']['embedding']
    exported = next(v for k, v in tensors.items() if k.endswith('word_embeddings.weight'))
    np.testing.assert_array_equal(exported[:word.shape[0]].astype(jnp.bfloat16).astype(
        np.float32)[:4], np.asarray(word, np.float32)[:4])  # widened exactly
