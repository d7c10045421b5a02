"""`--dry-run --compile-for=TOPOLOGY`: the run's own train step compiled for abstract TPU
devices (libtpu) on this CPU. The memory the compiler reports is checked against the
abstract state's sizes computed here independently (each leaf's shard shape from its
sharding), the splash kernel is in the compiled program when the target resolves to it,
and bad topologies, a missing libtpu and a config that does not fit are one `error:` line."""

import math
import sys

import numpy as np
import pytest

import launch

pytest.importorskip('libtpu')

TOPOLOGY = 'v5e:2x2'  # 4 devices, one per chip
SMALL = ['--config.model.num_layers=1', '--config.model.hidden_size=128',
         '--config.model.num_heads=2', '--config.model.intermediate_size=256',
         '--config.model.vocab_size=512', '--config.seq_len=64', '--config.batch_size=8']


def pretrain_argv(tmp_path, *extra: str) -> list[str]:
    return ['pretrain', '--config', 'configs/pretrain.py:tiny', '--workdir', str(tmp_path / 'w'),
            '--dry-run', f'--compile-for={TOPOLOGY}', *SMALL, *extra]


@pytest.fixture
def spy(monkeypatch):
    """Records the abstract state the CLI path builds and the Result it compiles."""
    from pretrain import compile_target
    from pretrain import state as state_lib
    seen = {}
    build, compile_pretrain = state_lib.build, compile_target.compile_pretrain

    def spy_build(*args, **kwargs):
        seen['built'] = build(*args, **kwargs)
        return seen['built']

    def spy_compile(*args, **kwargs):
        seen['result'] = compile_pretrain(*args, **kwargs)
        return seen['result']

    monkeypatch.setattr(state_lib, 'build', spy_build)
    monkeypatch.setattr(compile_target, 'compile_pretrain', spy_compile)
    return seen


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` laid out by `shardings` (jax's own shard_shape)."""
    import jax
    leaves, specs = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    assert len(leaves) == len(specs)
    return sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
               for x, s in zip(leaves, specs, strict=True))


def compiled_run(tmp_path, capsys, spy, *extra: str):
    """Runs the CLI; returns (stdout, Result, state bytes per device, params bytes/device)."""
    assert launch.main(pretrain_argv(tmp_path, *extra)) == 0
    out = capsys.readouterr().out
    built, result = spy['built'], spy['result']
    state = shard_bytes(built.abstract, built.shardings)
    params = shard_bytes(built.abstract.params, built.shardings.params)
    return out, result, state, params


def check_memory(result, state: int) -> None:
    """The compiler's argument bytes are the state plus this device's rows of the batch
    (input_ids and segment_ids, int32), up to TPU layout padding of tiny leaves."""
    batch = 2 * (8 // 4) * 64 * 4
    compiled = result.compiled
    assert state + batch <= compiled.argument <= state + batch + 16 * 1024, (compiled, state)
    # The donated state is aliased onto the new state, not held twice.
    assert state <= compiled.alias <= compiled.argument
    assert compiled.total == (compiled.argument + compiled.output - compiled.alias
                              + compiled.temp + compiled.code)


@pytest.mark.slow
def test_replicated_and_fsdp_memory_match_the_abstract_state(tmp_path, capsys, spy):
    out, result, state, params = compiled_run(tmp_path, capsys, spy)
    check_memory(result, state)
    assert result.sizes['params'] == params  # the report's own count agrees
    assert all(line in out for line in result.lines)
    assert f'compiled for {TOPOLOGY}: 4 devices' in out and 'HBM: fits' in out
    # No attention dropout: 'auto' resolves for the TPU target (not this CPU) to splash.
    assert 'splash_mha_fwd_segmented_residuals' in result.compiled.kernels
    assert 'pallas kernels: splash_mha_' in out
    # The compiled FLOPs are the counted ones plus what models/flops.py leaves out
    # (softmax, LayerNorm, the optimizer): within tens of percent at this size.
    assert 1.0 <= result.compiled.flops / (result.counted_flops / 4) < 1.5

    # Sharded 4 ways (fsdp), with attention dropout: the explicit kernel, no Pallas call.
    out, sharded, fsdp_state, fsdp_params = compiled_run(
        tmp_path, capsys, spy, '--config.mesh.shape=(1,4)',
        '--config.model.attention_dropout_rate=0.1')
    check_memory(sharded, fsdp_state)
    assert "'fsdp': 4" in out
    assert sharded.compiled.kernels == () and 'pallas kernels: none' in out
    # Every matrix is sharded 4 ways; only small vectors stay whole.
    assert 0.25 <= fsdp_params / params < 0.26
    assert 0.25 <= fsdp_state / state < 0.26
    assert sharded.compiled.argument < result.compiled.argument / 3


@pytest.mark.slow
def test_a_step_that_does_not_fit_names_what_to_change(tmp_path, capsys):
    # A batch whose activations are far over a v5e's 16 GiB: the TPU compiler refuses it.
    message = refused(capsys, pretrain_argv(tmp_path, '--config.batch_size=262144'))
    assert message.startswith(f'error: does not fit on {TOPOLOGY}: the compiler says: Ran '
                              'out of memory on HBM'), message
    assert message.endswith("; try shard the state with mesh.shape=(1,-1) (fsdp), "
                            'model.remat=dots, a smaller batch_size or grad_accum_steps > 1')


def refused(capsys, argv: list[str]) -> str:
    assert launch.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), captured.err
    assert captured.out == ''
    return lines[0]


@pytest.mark.parametrize('name, message', [
    ('v9:2x2', "error: --compile-for: 'v9:2x2' is not GENERATION:TOPOLOGY"),
    ('v5e', "error: --compile-for: 'v5e' is not GENERATION:TOPOLOGY"),
    ('v5e:3x7', "error: --compile-for: 'v5e:3x7': "),
])
def test_a_bad_topology_is_one_line(tmp_path, capsys, name, message):
    argv = pretrain_argv(tmp_path)
    argv[argv.index(f'--compile-for={TOPOLOGY}')] = f'--compile-for={name}'
    assert refused(capsys, argv).startswith(message)
    assert not (tmp_path / 'w').exists()


def test_a_missing_libtpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'libtpu', None)  # `import libtpu` raises ImportError
    message = refused(capsys, pretrain_argv(tmp_path))
    assert message.startswith('error: --compile-for needs the optional extra [tpu-compile]')


def test_compile_for_needs_dry_run(tmp_path, capsys):
    argv = [a for a in pretrain_argv(tmp_path) if a != '--dry-run']
    assert refused(capsys, argv) == ('error: --compile-for: needs --dry-run (it compiles, it '
                                     'does not run)')


# ---------------------------------------------------------------- fine-tuning


@pytest.fixture
def finetune_argv(tmp_path):
    from tests.helpers import write_toy_task
    task = write_toy_task(tmp_path)
    return ['finetune', '--config', 'configs/finetune.py:custom', '--workdir',
            str(tmp_path / 'ft'), '--config.init_from=none', f'--config.data.train_file={task}',
            '--dry-run', *SMALL]


@pytest.fixture
def finetune_spy(monkeypatch):
    """Records the abstract run the fine-tuning dry run builds and what it compiles."""
    from engine import compile_for
    from finetune import dry_run
    seen = {}
    abstract_run, compile_step = dry_run.abstract_run, compile_for.compile_step

    def spy_abstract(*args, **kwargs):
        seen['run'] = abstract_run(*args, **kwargs)
        return seen['run']

    def spy_compile(*args, **kwargs):
        seen['compiled'] = compile_step(*args, **kwargs)
        return seen['compiled']

    monkeypatch.setattr(dry_run, 'abstract_run', spy_abstract)
    monkeypatch.setattr(compile_for, 'compile_step', spy_compile)
    return seen


def sharded_state_bytes(state) -> int:
    import jax
    return shard_bytes(state, jax.tree.map(lambda x: x.sharding, state))


def test_finetune_dry_run_describes_the_run_and_writes_nothing(tmp_path, capsys, finetune_argv,
                                                              finetune_spy):
    from finetune.freeze import count_params_by_label
    argv = finetune_argv + ['--config.freeze=encoder', '--config.mesh.shape=(1,-1)']
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / 'ft').exists()
    run = finetune_spy['run']
    counts = count_params_by_label(run.state.params, run.labels)
    head = 128 * 128 + 128 + 128 * 2 + 2  # pooler and classifier train; the encoder not
    assert counts['train'] == head and counts["frozen"] > 10 * head
    assert f'params: 0.0M trainable, {counts["frozen"] / 1e6:.1f}M frozen (init: random)' in out
    assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1} = 8 devices" in out
    assert 'bert/encoder/layer_0/output/dense/kernel' in out and 'flops/step: ' in out
    assert 'memory/device: params ' in out and 'compiled for' not in out
    # The encoder's matrices are sharded 8 ways (fsdp) on the state the run would build.
    kernel = run.state.params['bert']['encoder']['layer_0']['output']['dense']['kernel']
    assert kernel.sharding.shard_shape(kernel.shape) == (256, 16)


@pytest.mark.slow
def test_finetune_compiles_its_own_train_step_for_a_tpu_slice(tmp_path, capsys, finetune_argv,
                                                              finetune_spy):
    argv = finetune_argv + [f'--compile-for={TOPOLOGY}', '--config.model.dropout_rate=0',
                            '--config.model.attention_dropout_rate=0']
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / 'ft').exists()
    compiled, run = finetune_spy['compiled'], finetune_spy['run']
    state = sharded_state_bytes(run.state)
    batch = (3 * 64 + 1) * (8 // 4) * 4  # ids, token types, mask (int32 rows) and labels
    assert state + batch <= compiled.argument <= state + batch + 16 * 1024, (compiled, state)
    assert state <= compiled.alias <= compiled.argument
    assert 'splash_mha_fwd_segmented_residuals' in compiled.kernels  # the TPU's kernel
    assert f'compiled for {TOPOLOGY}: 4 devices' in out and 'HBM: fits' in out


# ---------------------------------------------------------------- the compiled table


def test_compile_table_rows_and_markdown(tmp_path, monkeypatch):
    from studies import compile_table
    rows = compile_table.grid()
    # base and large at 128 and 512, modern base at 512 and 8,192; 3 slices x 3 remat x 2.
    assert len(rows) == 6 * 3 * 3 * 2
    assert compile_table.overrides(rows[0], '(-1,)') == [
        'seq_len=128', 'model.remat=none', 'mesh.shape=(-1,)', 'model.attention_impl=explicit']
    long = next(r for r in rows if r['seq'] == 8192 and r['attention'] == 'fused')
    assert compile_table.overrides(long, '(1,-1)')[3:] == [
        'model.max_position_embeddings=8192', 'model.attention_dropout_rate=0']
    figures = {'seconds': 61.0, 'total_gib': 3.5, 'hbm_gib': 16.0, 'fits': True, 'flops': 2e12,
               'counted': 1.6e12, 'step_s': 0.0125, 'mfu': 0.65, 'kernels': []}
    refused = {'error': 'does not fit ...', 'seconds': 30.0, 'temp_gib': 19.15}
    answers = iter([figures, refused])
    monkeypatch.setattr(compile_table, 'run_row', lambda row, mesh, timeout: next(answers))
    out = tmp_path / 't.md'
    compile_table.main(['--only', 'base 128 v5e:2x4 none', '--out', str(out)])
    lines = out.read_text().splitlines()
    assert lines[0] == compile_table.HEADER and len(lines) == 4
    assert lines[2] == ('| base | 128 | v5e-8 | none | explicit | 3.50 of 16 | yes | 2,000 | '
                        '1,600 | x1.25 | 12.5 | 65 % | 61 |')
    assert lines[3] == ('| base | 128 | v5e-8 | none | fused | > 19.1 (temporaries) | '
                        'no (compiler) |  |  |  |  |  | 30 |')


@pytest.mark.slow
def test_compile_table_compiles_a_row(monkeypatch):
    from studies import compile_table
    monkeypatch.setitem(compile_table.SLICES, 'v5e-4', TOPOLOGY)
    row = dict(model='tiny', seq=64, slice='v5e-4', remat='dots', attention='fused')
    got = compile_table.compile_row(row, '(1,-1)')
    assert got['fits'] and got['hbm_gib'] == 16 and 0 < got['total_gib'] < 1
    assert any(k.startswith('splash_mha_fwd') for k in got['kernels'])
    assert 1.0 <= got['flops'] / got['counted'] < 1.5
    assert '| tiny | 64 | v5e-4 | dots | fused | ' in compile_table.markdown_row(row, got)
