"""The prepared GPU benchmark: one command, one GPU, at most 8 minutes, one Markdown table.

    python -m pretrain.benchmark --suite gpu [--out FILE] [--peak-flops F] [--config.KEY=V]
    python -m pretrain.benchmark --suite gpu --size tiny   # the CPU smoke run (CI runs it)

The grid: BERT-base and `recipe=modern` base, seq 128 and 512, fused attention (cuDNN) vs
explicit, remat none and dots; bf16 compute with float32 parameters, dropout 0 (the fused
kernels have no attention dropout). Each cell compiles and times the real pretraining step
(pretrain/step_runner.py) on synthetic full-length batches of --tokens per step, on one
device, and reports its compile time, tokens/s, MFU against the device's dense bf16 peak
(engine/hardware.py, or --peak-flops), the device's peak memory and XLA's compiled estimate.

Budget: --deadline seconds from the start, compiles included. A cell that would end after
it (judged by the longest cell so far) is skipped with all after it, and the output says so.
On a GPU each cell runs in a process of its own (--isolate), so the peak memory is the
cell's own and a cell that runs out of memory is reported while the suite goes on.

Without a GPU the suite runs at --size tiny (L2/H128, seq 32 and 64), 'xla' attention
standing in for cuDNN, and says it is a CPU smoke run.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

import jax

from configs.pretrain import get_config
from engine.config_cli import PROJECT_ROOT, apply_overrides, split_config_args
from engine.errors import ConfigError
from engine.hardware import known_peak_flops
from pretrain.step_runner import JaxRunner


@dataclasses.dataclass(frozen=True)
class Size:
    config: str  # the size in configs/pretrain.py
    seqs: str  # default --seqs
    tokens: int  # default --tokens (per step)
    steps: int  # default --steps (per timed repeat)
    repeats: int  # default --repeats


SIZES = {'base': Size('base', '128,512', 32768, 10, 3), 'tiny': Size('tiny', '32,64', 256, 2, 1)}
MODELS = {'bert': '', 'modern': ',recipe=modern'}  # -> configs/pretrain.py arg suffix
ATTENTION = ('fused', 'explicit')
REMAT = ('none', 'dots', 'full')
# Keys the grid sets in every cell; --config.* may not override them.
GRID_KEYS = ('seq_len', 'batch_size', 'model.dtype', 'model.attention_impl', 'model.remat',
             'model.dropout_rate', 'model.attention_dropout_rate', 'mesh.shape')
WARMUP_STEPS = 2
RESULT = 'suite-cell-result: '  # prefix of a child process's result line
COLUMNS = ('model', 'seq', 'batch', 'attention', 'kernel', 'remat', 'compile s', 'step ms',
           'tokens/s', 'TFLOP/s', 'MFU %', 'peak MiB', 'compiled MiB')


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str  # MODELS key
    seq: int
    attention: str  # ATTENTION
    remat: str


def _list(text: str, allowed=None, kind=str) -> list:
    """Comma list of `kind` values (of `allowed`; positive ints); ValueError otherwise."""
    expected = f'expected a comma list of {list(allowed) if allowed else "positive integers"}'
    try:
        items = [kind(x.strip()) for x in text.split(',') if x.strip()]
    except ValueError:
        raise ValueError(expected) from None
    bad = [x for x in items if (x not in allowed if allowed is not None else x < 1)]
    if not items or bad:
        raise ValueError(expected)
    return items


def parse_args(argv: list[str]) -> argparse.Namespace:
    spec, overrides, rest = split_config_args(argv)
    if spec:
        raise ConfigError('--suite: the grid picks its configs; drop --config (use --config.KEY=V)')
    for item in overrides:
        if item.partition('=')[0] in GRID_KEYS:
            raise ConfigError(f'--config.{item.partition("=")[0]}: set by the suite grid per '
                              'cell (see --seqs, --tokens, --attention, --remat)')
    p = argparse.ArgumentParser(prog='python -m pretrain.benchmark --suite gpu',
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--suite', choices=('gpu',), required=True)
    p.add_argument('--size', choices=('auto', *SIZES), default='auto',
                   help='auto: base on a GPU, else tiny (a CPU smoke run)')
    p.add_argument('--models', default='bert,modern', help=f'of {list(MODELS)}')
    p.add_argument('--seqs', help='sequence lengths (default: 128,512; tiny: 32,64)')
    p.add_argument('--attention', default='fused,explicit', help=f'of {list(ATTENTION)}')
    p.add_argument('--remat', default='none,dots', help=f'of {list(REMAT)}')
    p.add_argument('--tokens', type=int, help='tokens per step; batch = tokens // seq')
    p.add_argument('--steps', type=int, help='steps per timed repeat')
    p.add_argument('--repeats', type=int, help='timed repeats (the median is reported)')
    p.add_argument('--deadline', type=float, default=480.0, help='seconds for the whole suite')
    p.add_argument('--peak-flops', type=float, default=0.0,
                   help='the device\'s dense bf16 FLOP/s for MFU (default: its spec)')
    p.add_argument('--isolate', action=argparse.BooleanOptionalAction,
                   help='one process per cell (default: on a GPU)')
    p.add_argument('--out', help='also write the Markdown to this file')
    p.add_argument('--cell', help=argparse.SUPPRESS)  # a child process's one cell (JSON)
    args = p.parse_args(rest)
    args.overrides = overrides
    return args


def resolve(args: argparse.Namespace, platform: str) -> argparse.Namespace:
    """Fills the size's defaults and checks the lists; ConfigError names the flag."""
    args.platform = platform
    args.size = args.size if args.size != 'auto' else ('base' if platform == 'gpu' else 'tiny')
    size = SIZES[args.size]
    for name in ('tokens', 'steps', 'repeats'):
        if getattr(args, name) is None:
            setattr(args, name, getattr(size, name))
        if getattr(args, name) < 1:
            raise ConfigError(f'--{name}: must be at least 1')
    lists = {'models': (MODELS, str), 'seqs': (None, int), 'attention': (ATTENTION, str),
             'remat': (REMAT, str)}
    for name, (allowed, kind) in lists.items():
        text = getattr(args, name) or size.seqs
        try:
            setattr(args, name, _list(text, allowed, kind))
        except ValueError as e:
            raise ConfigError(f'--{name} {text!r}: {e}') from None
    if args.isolate is None:
        args.isolate = platform == 'gpu'
    return args


def grid(args: argparse.Namespace) -> list[Cell]:
    """Remat outermost, attention innermost: fused and explicit of one shape run together,
    so a deadline leaves whole comparisons."""
    return [Cell(m, s, a, r) for r in args.remat for m in args.models for s in args.seqs
            for a in args.attention]


def cell_config(cell: Cell, args: argparse.Namespace):
    """The pretraining config of one cell: the size's config, the overrides, the grid keys."""
    try:
        cfg = get_config(SIZES[args.size].config + MODELS[cell.model])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    apply_overrides(cfg, args.overrides)
    if cell.seq > cfg.model.max_position_embeddings and cfg.model.position_embedding == 'learned':
        raise ConfigError(f'--seqs: {cell.seq} is longer than model.max_position_embeddings '
                          f'({cfg.model.max_position_embeddings})')
    cfg.seq_len, cfg.batch_size = cell.seq, max(1, args.tokens // cell.seq)
    cfg.mesh.shape = (1,)
    m = cfg.model
    m.dtype, m.remat, m.dropout_rate, m.attention_dropout_rate = 'bfloat16', cell.remat, 0.0, 0.0
    fused = 'cudnn' if args.platform == 'gpu' else 'xla'  # xla stands in off a GPU
    m.attention_impl = fused if cell.attention == 'fused' else 'explicit'
    return cfg


def measure(cell: Cell, args: argparse.Namespace) -> dict:
    """Compile, warm up and time one cell in this process."""
    cfg = cell_config(cell, args)
    runner = JaxRunner(cfg, jax.devices()[:1])
    runner.run(WARMUP_STEPS)
    seconds = statistics.median(runner.run(args.steps) for _ in range(args.repeats))
    memory = runner.memory()
    kernel = cfg.model.attention_impl
    if kernel == 'cudnn' and not runner.cudnn_attention:
        kernel = 'xla (cuDNN fell back)'
    return {'batch': cfg.batch_size, 'kernel': kernel, 'compile_s': runner.compile_seconds,
            'step_s': seconds, 'tokens_per_s': cfg.batch_size * cfg.seq_len / seconds,
            'flops_per_s': runner.flops / seconds, 'peak_bytes': memory.get('device_peak'),
            'compiled_bytes': memory.get('compiled')}


def measure_isolated(cell: Cell, args: argparse.Namespace, timeout: float) -> dict:
    """`measure` in a child process; {'error': ...} when it fails or outlives `timeout`."""
    payload = json.dumps({'cell': dataclasses.asdict(cell), **{k: getattr(args, k) for k in (
        'size', 'platform', 'tokens', 'steps', 'repeats', 'overrides')}})
    try:
        done = subprocess.run([sys.executable, '-m', 'pretrain.benchmark_suite', '--suite', 'gpu',
                               '--cell', payload],
                              capture_output=True, text=True, timeout=timeout,
                              cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired:
        return {'error': f'stopped at the deadline ({args.deadline:.0f} s)', 'deadline': True}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    lines = [x for x in done.stderr.splitlines() if x.strip()]
    return {'error': f'exit {done.returncode}: ' + (lines[-1][:300] if lines else 'no output')}


def run_child(payload: str) -> int:
    """The --cell entry: measure one cell, print its result line."""
    spec = json.loads(payload)
    args = argparse.Namespace(**{k: v for k, v in spec.items() if k != 'cell'})
    print(RESULT + json.dumps(measure(Cell(**spec['cell']), args)), flush=True)
    return 0


def default_backend() -> str:
    """The platform, started without XLA's GPU memory preallocation: this process only
    orchestrates the children (which preallocate as the user's environment says)."""
    saved = os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE')
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
    try:
        return jax.default_backend()
    finally:  # read once, when the backend starts
        if saved is None:
            os.environ.pop('XLA_PYTHON_CLIENT_PREALLOCATE')
        else:
            os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = saved


def run_grid(args: argparse.Namespace, start: float) -> tuple[list, list, list]:
    """(rows of (cell, result), failed (cell, error), skipped cells) within the deadline."""
    cells, rows, failed = grid(args), [], []
    longest = 0.0
    for i, cell in enumerate(cells):
        elapsed = time.perf_counter() - start
        if elapsed + longest > args.deadline:
            return rows, failed, cells[i:]
        began = time.perf_counter()
        if args.isolate:
            result = measure_isolated(cell, args, args.deadline - elapsed)
        else:
            try:
                result = measure(cell, args)
            except jax.errors.JaxRuntimeError as e:  # out of memory, mostly
                result = {'error': str(e).splitlines()[0][:300]}
        longest = max(longest, time.perf_counter() - began)
        print(f'[{i + 1}/{len(cells)}] {_name(cell, args)}: ' + (
            result['error'] if 'error' in result else
            f"compile {result['compile_s']:.1f} s, {1e3 * result['step_s']:.1f} ms/step"),
            file=sys.stderr, flush=True)
        if 'error' in result:
            failed.append((cell, result['error']))
            if result.get('deadline'):
                return rows, failed, cells[i + 1:]
        else:
            rows.append((cell, result))
    return rows, failed, []


def _name(cell: Cell, args: argparse.Namespace) -> str:
    model = {'bert': 'BERT', 'modern': 'modern'}[cell.model]
    return f'{model}-{SIZES[args.size].config} seq {cell.seq} {cell.attention} remat {cell.remat}'


def _mib(value) -> str:
    return '-' if value is None else f'{value / 2**20:,.0f}'


def table(rows: list, args: argparse.Namespace, peak: float | None) -> list[str]:
    """The Markdown table, one row per measured cell."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |',
             '|' + '|'.join('---' if i < 6 else '---:' for i in range(len(COLUMNS))) + '|']
    for cell, r in rows:
        mfu = '-' if not peak else f"{100 * r['flops_per_s'] / peak:.1f}"
        model = {'bert': 'BERT', 'modern': 'modern'}[cell.model] + '-' + SIZES[args.size].config
        values = (model, cell.seq, r['batch'], cell.attention, r['kernel'], cell.remat,
                  f"{r['compile_s']:.1f}", f"{1e3 * r['step_s']:.1f}",
                  f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_s'] / 1e12:.3f}", mfu,
                  _mib(r['peak_bytes']), _mib(r['compiled_bytes']))
        lines.append('| ' + ' | '.join(str(v) for v in values) + ' |')
    return lines


def header(args: argparse.Namespace, peak: float | None) -> list[str]:
    device = jax.devices()[0]
    lines = [f'# Train-step benchmark: {device.device_kind} ({args.platform}), jax '
             f'{jax.__version__}, size {args.size}, {args.tokens:,} tokens per step', '']
    if args.platform != 'gpu':
        lines += [f'CPU smoke run ({args.platform}): {args.size} size; attention \'xla\' '
                  'stands in for cuDNN. These numbers say nothing about a GPU.', '']
    if peak:
        source = 'given' if args.peak_flops else 'dense bf16 spec'
        lines += [f'MFU against {peak / 1e12:,.0f} TFLOP/s ({source}).', '']
    return lines


def footer(args: argparse.Namespace, failed: list, skipped: list, peak: float | None,
           seconds: float) -> list[str]:
    lines = ['', f'bf16 compute, float32 parameters and Adam moments, dropout 0; median of '
             f'{args.repeats} x {args.steps} steps after {WARMUP_STEPS} warm-up steps. compile '
             '= lowering + XLA compile of the step; peak = the device\'s peak_bytes_in_use '
             + ('of the cell\'s own process' if args.isolate else '(one process: a running peak)')
             + '; compiled = XLA\'s estimate (arguments + outputs - donated + temporaries).']
    if not peak:
        lines.append(f"No known bf16 peak for {jax.devices()[0].device_kind!r}: MFU '-'; "
                     'pass --peak-flops (its dense bf16 FLOP/s) for MFU.')
    lines += [f'failed: {_name(c, args)}: {error}' for c, error in failed]
    if skipped:
        lines.append(f'deadline ({args.deadline:.0f} s) reached: skipped {len(skipped)} cells: '
                     + '; '.join(_name(c, args) for c in skipped))
    lines.append(f'total: {seconds:.0f} s')
    return lines


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    try:
        args = parse_args(argv)
        if args.cell:
            return run_child(args.cell)
        args = resolve(args, default_backend())
        cell_config(grid(args)[0], args)  # a bad override is one error line, before any work
        peak = args.peak_flops or known_peak_flops(jax.devices()[0].device_kind)
        if args.platform != 'gpu' and not args.peak_flops:
            peak = None  # a CPU has no stable peak (engine/hardware.py)
        rows, failed, skipped = run_grid(args, start)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    lines = (header(args, peak) + table(rows, args, peak)
             + footer(args, failed, skipped, peak, time.perf_counter() - start))
    text = '\n'.join(lines) + '\n'
    print(text, end='')
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text)
    return 0 if rows and all(math.isfinite(r['step_s']) for _, r in rows) else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
