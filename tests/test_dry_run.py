"""`launch.py pretrain --dry-run`: abstract only, published sizes, exact per-device bytes."""

import functools
import re

import flax.linen as nn
import jax
import pytest

import launch
from configs.pretrain import get_config
from engine import mesh as mesh_lib
from engine.optim import OptimizerConfig, make_optimizer
from models.bert import BertForMaskedLM
from pretrain import dry_run, steps
from pretrain.sections import bert_config


def dry(capsys, tmp_path, size: str, *overrides: str) -> tuple[int, str, str]:
    argv = ['pretrain', '--config', f'configs/pretrain.py:{size}', '--workdir',
            str(tmp_path / 'never'), '--dry-run', *overrides]
    code = launch.main(argv)
    out, err = capsys.readouterr()
    assert not (tmp_path / 'never').exists()  # a dry run writes nothing
    return code, out, err


@pytest.mark.parametrize('size, published', [('base', 110e6), ('large', 335e6)])
def test_published_sizes_on_a_mesh_bigger_than_this_machine(capsys, tmp_path, size, published):
    code, out, err = dry(capsys, tmp_path, size, '--config.model.vocab_size=30522',
                         '--config.mesh.shape=(16,4,2)', '--config.batch_size=512')
    assert code == 0, err
    params = float(re.search(r'^params: ([\d.]+)M$', out, re.M).group(1)) * 1e6
    assert abs(params / published - 1) < 0.02, params
    assert "mesh: {'data': 16, 'fsdp': 4, 'tensor': 2} = 128 devices" in out
    assert '  batch_size: 256 -> 512' in out  # the diff from the config file's defaults
    hidden = 768 if size == 'base' else 1024
    # vocab over tensor (2), embed over fsdp (4): the per-device shard of the embedding.
    assert re.search(rf'bert/embeddings/word_embeddings/embedding +\(30522, {hidden}\) +'
                     rf"\('vocab', 'embed'\) +\('tensor', 'fsdp'\) +\(15261, {hidden // 4}\)",
                     out)
    assert re.search(r'^memory/device: params [\d.]+ GiB, optimizer state [\d.]+ GiB, '
                     r'gradients [\d.]+ GiB, activations ~[\d.]+ GiB .* total ~[\d.]+ GiB$',
                     out, re.M)
    assert re.search(r'^flops/step: [\d.]+e\+\d+', out, re.M)


@pytest.mark.parametrize('overrides, message', [
    (['--config.mesh.shape=(64,)', '--config.batch_size=96'],
     'batch_size: 96 is not divisible by the data-parallel size 64 x grad_accum_steps 1'),
    (['--config.seq_len=1024'], 'seq_len: 1024 exceeds model.max_position_embeddings (512)'),
    (['--config.mesh.shape=(3,-1)'], 'mesh.shape: mesh.shape (3, -1, 1): 8 devices do not '
                                     'divide by 3'),
])
def test_inconsistent_configs_fail_in_one_line(capsys, tmp_path, overrides, message):
    code, out, err = dry(capsys, tmp_path, 'base', *overrides)
    assert code == 2 and err == f'error: {message}\n', err


def test_per_device_bytes_match_a_real_sharded_state():
    """The dry run's bytes per device equal what a real (2, 4) mesh puts on device 0."""
    cfg = get_config('tiny')
    cfg.model.num_layers, cfg.model.vocab_size, cfg.seq_len = 1, 200, 32
    cfg.mesh.shape = (2, 4)
    mesh = dry_run.abstract_mesh(cfg)
    abstract, shardings, _ = dry_run.abstract_state(cfg, mesh)
    expected = mesh_lib.sharded_bytes(abstract, shardings, dict(mesh.shape))

    real_mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    model = BertForMaskedLM(bert_config(cfg))
    optimizer = OptimizerConfig.from_config(cfg.optimizer)
    init = functools.partial(steps.init_state, jax.random.key(0), model,
                             make_optimizer(optimizer, 10), cfg.seq_len)
    with mesh_lib.sharding_context(real_mesh, cfg.mesh.rules):
        _, real_shardings = mesh_lib.abstract_and_shardings(init, real_mesh, cfg.mesh.rules)
        state = jax.jit(lambda: nn.unbox(init()), out_shardings=real_shardings)()
    device = jax.devices()[0]
    on_device = sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
                    for shard in leaf.addressable_shards if shard.device == device)
    assert expected == on_device
    # And sharding does split the state: 8 devices hold much less than all of it each.
    assert on_device < 0.3 * sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def test_remat_lowers_the_activation_estimate():
    cfg = get_config('base')
    model = bert_config(cfg)
    shape = {'data': 8, 'fsdp': 1, 'tensor': 1}
    estimates = {}
    for remat in ('none', 'dots', 'full'):
        cfg.model.remat = remat
        estimates[remat] = dry_run.activation_bytes(bert_config(cfg), cfg, shape, 20)
    assert estimates['none'] > estimates['dots'] > estimates['full'] > 0
    # Twice the data parallelism, half the per-device activations.
    cfg.model.remat = 'none'
    half = dry_run.activation_bytes(model, cfg, {**shape, 'data': 16}, 20)
    assert half * 2 == pytest.approx(estimates['none'], rel=1e-6)
