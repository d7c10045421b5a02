"""The compiled table: pretraining train steps compiled for TPU slices on this machine.

    python -m studies.compile_table --out docs/compile_table.md            # the whole grid
    python -m studies.compile_table --only 'base 128 v5e:2x4' --out t.md   # rows matching

Each row is `launch.py pretrain --dry-run --compile-for=TOPOLOGY` (pretrain/compile_target.py:
the run's own train step, on abstract TPU devices, nothing allocated) for one model, sequence
length, slice, remat policy and attention kernel, compiled in a subprocess of its own (a
per-row time limit; libtpu's memory goes back after each). Columns: HBM per device as the
compiler lays the step out (arguments + outputs not aliased + temporaries + code), whether
it fits, FLOPs per device compiled and counted (models/flops.py), and the step time and
MFU the compiler's cost model estimates: an estimate, not a measurement.

Attention: 'explicit' is the configured attention dropout (0.1 for base and large) on the
explicit kernel; 'fused' is attention dropout 0, which a TPU run resolves to the splash
kernel. The global batch is the config's (256 sequences); the mesh is data-parallel
(mesh.shape=(-1,)) unless --mesh says otherwise. The Markdown file is rewritten after every
row, so a long grid can be stopped and its finished rows kept.
"""

import argparse
import itertools
import json
import re
import subprocess
import sys
import time

MODELS = ('base', 'large')
SLICES = {'v5e-8': 'v5e:2x4', 'v5e-256': 'v5e:16x16', 'v4-32': 'v4:2x2x4'}
REMATS = ('none', 'dots', 'full')
ATTENTIONS = ('explicit', 'fused')
GiB = 1024 ** 3


def grid() -> list[dict]:
    """base and large at seq 128 and 512, base with recipe=modern at 512 and 8,192; every
    slice, remat and attention kernel."""
    shapes = [(m, s) for m in MODELS for s in (128, 512)]
    shapes += [('base,recipe=modern', 512), ('base,recipe=modern', 8192)]
    return [dict(model=m, seq=s, slice=name, remat=r, attention=a)
            for (m, s), name, r, a in itertools.product(shapes, SLICES, REMATS, ATTENTIONS)]


def row_name(row: dict) -> str:
    return f"{row['model']} {row['seq']} {SLICES[row['slice']]} {row['remat']} {row['attention']}"


def overrides(row: dict, mesh: str) -> list[str]:
    """The row as config overrides (`--config.` + each, on the command line)."""
    items = [f"seq_len={row['seq']}", f"model.remat={row['remat']}", f'mesh.shape={mesh}']
    if row['seq'] > 512:  # a learned position table long enough (rope ignores it)
        items.append(f"model.max_position_embeddings={row['seq']}")
    if row['attention'] == 'fused':
        items.append('model.attention_dropout_rate=0')
    else:
        items.append('model.attention_impl=explicit')
    return items


def compile_row(row: dict, mesh: str) -> dict:
    """One row, compiled in this process: the figures, or why there are none."""
    from engine import compile_for
    from engine.config_cli import apply_overrides, load_config
    from engine.errors import ConfigError
    from pretrain import continual
    from pretrain.compile_target import compile_pretrain

    cfg = load_config(f"configs/pretrain.py:{row['model']}")
    apply_overrides(cfg, overrides(row, mesh))
    cfg, _ = continual.resolve(cfg)
    start = time.perf_counter()
    try:
        result = compile_pretrain(cfg, SLICES[row['slice']])
    except ConfigError as e:
        refused = re.search(r'required for HLO temporaries \(([\d.]+)G\)', str(e))
        return {'error': str(e), 'seconds': time.perf_counter() - start,
                'temp_gib': float(refused.group(1)) if refused else None}
    c, target = result.compiled, result.target
    return {'seconds': time.perf_counter() - start, 'total_gib': c.total / GiB,
            'hbm_gib': target.hbm_bytes / GiB, 'fits': compile_for.fits(target, c),
            'flops': c.flops, 'counted': result.counted_flops / len(target.devices),
            'step_s': c.seconds, 'mfu': compile_for.mfu(target, c, result.counted_flops),
            'kernels': list(c.kernels)}


def run_row(row: dict, mesh: str, timeout: float) -> dict:
    """compile_row in a subprocess of its own, within `timeout` seconds."""
    command = [sys.executable, '-m', 'studies.compile_table', '--row', json.dumps(row),
               '--mesh', mesh]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'not compiled within {timeout:.0f} s', 'seconds': timeout}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ['no output'])[-1]
        return {'error': tail[:200], 'seconds': time.perf_counter() - start}
    return json.loads(lines[-1])


HEADER = ('| model | seq | slice | remat | attention | HBM/device GiB | fits | compiled '
          'GFLOP/device | counted | compiled/counted | est. step ms | est. MFU | compile s |')


def markdown_row(row: dict, got: dict) -> str:
    cells = [row['model'], str(row['seq']), row['slice'], row['remat'], row['attention']]
    if 'error' in got:
        refused = got.get('temp_gib')
        if refused is None:
            return '| ' + ' | '.join(cells + [f"({got['error']})"] + [''] * 6
                                     + [f"{got['seconds']:.0f}"]) + ' |'
        cells += [f'> {refused:.1f} (temporaries)', 'no (compiler)'] + [''] * 5
        return '| ' + ' | '.join(cells + [f"{got['seconds']:.0f}"]) + ' |'
    step = f"{got['step_s'] * 1e3:.1f}" if got['step_s'] else 'n/a'
    mfu = f"{100 * got['mfu']:.0f} %" if got['mfu'] else 'n/a'
    cells += [f"{got['total_gib']:.2f} of {got['hbm_gib']:.0f}", 'yes' if got['fits'] else 'no',
              f"{got['flops'] / 1e9:,.0f}", f"{got['counted'] / 1e9:,.0f}",
              f"x{got['flops'] / got['counted']:.2f}", step, mfu, f"{got['seconds']:.0f}"]
    return '| ' + ' | '.join(cells) + ' |'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='', help='Markdown file, rewritten after every row')
    parser.add_argument('--only', default='', help="rows whose 'model seq topology remat "
                        "attention' name contains this (e.g. 'base 128 v5e:2x4')")
    parser.add_argument('--mesh', default='(-1,)', help='mesh.shape of every row')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per row')
    parser.add_argument('--row', default='', help=argparse.SUPPRESS)  # one row, as JSON
    args = parser.parse_args(argv)
    if args.row:
        from engine.compile_for import prepare_environment
        prepare_environment()
        print(json.dumps(compile_row(json.loads(args.row), args.mesh)), flush=True)
        return
    rows = [r for r in grid() if args.only in row_name(r)]
    lines = [HEADER, '|' + '---|' * HEADER.count(' | ') + '---|']
    for row in rows:
        lines.append(markdown_row(row, run_row(row, args.mesh, args.timeout)))
        print(lines[-1], flush=True)
        if args.out:
            with open(args.out, 'w') as f:
                f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
