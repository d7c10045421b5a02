"""`python -m pretrain.benchmark --suite gpu` at its CPU smoke size: the table end to end,
the deadline, the per-cell child process and the one-line errors."""

import math

import pytest

from pretrain import benchmark, benchmark_suite

SMOKE = ['--suite', 'gpu', '--size', 'tiny']


def table_rows(text: str) -> tuple[list[str], list[dict]]:
    """(header, rows as dicts) of the one Markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith('|')]
    split = [[c.strip() for c in line.strip('|').split('|')] for line in lines]
    header, body = split[0], split[2:]
    assert set(split[1]) <= {'---', '---:'}
    return header, [dict(zip(header, row, strict=True)) for row in body]


def positive(text: str) -> float:
    value = float(text.replace(',', ''))
    assert math.isfinite(value) and value > 0, text
    return value


def test_default_grid_is_the_gpu_grid():
    args = benchmark_suite.resolve(benchmark_suite.parse_args(['--suite', 'gpu']), 'gpu')
    cells = benchmark_suite.grid(args)
    assert (args.size, args.isolate, args.tokens) == ('base', True, 32768)
    assert len(cells) == 16 == len(set(cells))
    assert {(c.model, c.seq, c.attention, c.remat) for c in cells} == {
        (m, s, a, r) for m in ('bert', 'modern') for s in (128, 512)
        for a in ('fused', 'explicit') for r in ('none', 'dots')}
    assert [c.attention for c in cells[:2]] == ['fused', 'explicit']  # pairs run together
    cfg = benchmark_suite.cell_config(cells[1], args)
    assert (cfg.model.attention_impl, cfg.model.dtype, cfg.batch_size) == ('explicit',
                                                                           'bfloat16', 256)
    fused = benchmark_suite.cell_config(cells[0], args).model
    assert (fused.attention_impl, fused.attention_dropout_rate, fused.hidden_size) == (
        'cudnn', 0.0, 768)
    modern = benchmark_suite.cell_config(cells[4], args)
    assert modern.model.position_embedding == 'rope' and modern.batch_size == 256
    cpu = benchmark_suite.resolve(benchmark_suite.parse_args(['--suite', 'gpu']), 'cpu')
    assert (cpu.size, cpu.isolate, cpu.seqs) == ('tiny', False, [32, 64])
    assert benchmark_suite.cell_config(cells[0], cpu).model.attention_impl == 'xla'


@pytest.mark.slow
def test_cpu_smoke_table(capsys, tmp_path):
    out = tmp_path / 'suite.md'
    # One length keeps it short; both models, kernels and remat policies still run.
    code = benchmark_suite.main([*SMOKE, '--seqs', '32', '--peak-flops', '1e11',
                                 '--out', str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert 'CPU smoke run' in text and 'skipped' not in text and 'failed' not in text
    assert out.read_text() == text
    header, rows = table_rows(text)
    assert tuple(header) == benchmark_suite.COLUMNS
    assert len(rows) == 8
    assert {(r['model'], r['attention'], r['remat']) for r in rows} == {
        (m, a, r) for m in ('BERT-tiny', 'modern-tiny') for a in ('fused', 'explicit')
        for r in ('none', 'dots')}
    for row in rows:
        assert row['kernel'] == {'fused': 'xla', 'explicit': 'explicit'}[row['attention']]
        assert (row['seq'], row['batch'], row['peak MiB']) == ('32', '8', '-')  # CPU: no peak
        for column in ('compile s', 'step ms', 'tokens/s', 'TFLOP/s', 'MFU %', 'compiled MiB'):
            positive(row[column])
        tokens = 8 * 32 / (positive(row['step ms']) / 1e3)
        assert math.isclose(positive(row['tokens/s']), tokens, rel_tol=0.01)
        mfu = positive(row['TFLOP/s']) * 1e12 / 1e11 * 100
        assert math.isclose(positive(row['MFU %']), mfu, rel_tol=0.1)  # TFLOP/s is rounded


def test_unknown_peak_prints_dash_and_says_to_pass_it():
    args = benchmark_suite.resolve(benchmark_suite.parse_args(SMOKE), 'cpu')
    cell = benchmark_suite.Cell('bert', 32, 'fused', 'none')
    result = {'batch': 8, 'kernel': 'xla', 'compile_s': 1.0, 'step_s': 0.01,
              'tokens_per_s': 25600.0, 'flops_per_s': 1e9, 'peak_bytes': 2**30,
              'compiled_bytes': 2**20}
    _, (row,) = table_rows('\n'.join(benchmark_suite.table([(cell, result)], args, None)))
    assert (row['MFU %'], row['peak MiB'], row['compiled MiB']) == ('-', '1,024', '1')
    footer = '\n'.join(benchmark_suite.footer(args, [], [], None, 1.0))
    assert "MFU '-'" in footer and 'pass --peak-flops' in footer
    _, (row,) = table_rows('\n'.join(benchmark_suite.table([(cell, result)], args, 1e10)))
    assert row['MFU %'] == '10.0'


def test_deadline_skips_the_remaining_cells(monkeypatch):
    """Each fake cell takes 10 s of a fake clock: with 25 s, the third would end past the
    deadline, so it and all after it are skipped and named."""
    clock = [0.0]
    monkeypatch.setattr(benchmark_suite.time, 'perf_counter', lambda: clock[0])

    def fake_measure(cell, args):
        clock[0] += 10.0
        return {'compile_s': 1.0, 'step_s': 0.1}
    monkeypatch.setattr(benchmark_suite, 'measure', fake_measure)
    args = benchmark_suite.resolve(benchmark_suite.parse_args([*SMOKE, '--deadline', '25']),
                                   'cpu')
    rows, failed, skipped = benchmark_suite.run_grid(args, start=0.0)
    cells = benchmark_suite.grid(args)
    assert [c for c, _ in rows] == cells[:2] and not failed and skipped == cells[2:]
    footer = '\n'.join(benchmark_suite.footer(args, failed, skipped, None, 20.0))
    assert 'deadline (25 s) reached: skipped 14 cells' in footer
    assert benchmark_suite._name(cells[-1], args) in footer


@pytest.mark.slow
def test_isolated_cell_runs_in_a_child_process(capsys):
    code = benchmark_suite.main([*SMOKE, '--isolate', '--models', 'modern', '--seqs', '32',
                                 '--attention', 'fused', '--remat', 'dots'])
    text = capsys.readouterr().out
    assert code == 0, text
    _, (row,) = table_rows(text)
    assert (row['model'], row['kernel'], row['remat']) == ('modern-tiny', 'xla', 'dots')
    positive(row['tokens/s'])
    positive(row['compile s'])
    assert "cell's own process" in text


@pytest.mark.parametrize('argv, message', [
    (['--remat', 'bogus'], "--remat 'bogus': expected a comma list of ['none', 'dots', 'full']"),
    (['--seqs', '32,x'], 'expected a comma list of positive integers'),
    (['--seqs', '1024'], 'longer than model.max_position_embeddings'),
    (['--config.model.remat=dots'], '--config.model.remat: set by the suite grid'),
    (['--config.model.nope=1'], 'model.nope'),
    (['--steps', '0'], '--steps: must be at least 1'),
])
def test_bad_arguments_are_one_error_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main([*SMOKE, *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith('error: ') and message in err and '\n' not in err
