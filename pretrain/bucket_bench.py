"""Reading a prepared corpus in place from a bucket: bytes, disk, memory and speed per host.

    python -m pretrain.bucket_bench --size-mb 64 --cache-mb 16 --read-block 1 --read-block 32

Needs the test extras (gcp-storage-emulator): a local GCS server (tests/fake_gcs.py) runs
in its own process and serves a prepared corpus of --size-mb MB (synthetic packed
sequences of --seq-len tokens, uint16, RECORDS_PER_FILE per shard, written like
`launch.py prepare` writes them). Per --read-block, two reader processes (process 0 and 1
of 2, as two hosts) each take --steps batches of their half of a --batch-size global
batch through PretrainBatches.iterate (grain's threads, as training does), with a cache
of --cache-mb MB each. Columns, per process:

  block      data.read_block
  B/step     bytes fetched from the bucket per step / bytes of its rows (1 = exactly them)
  ranges     range reads per step
  cache MB   the cache directory's disk use at the end (st_blocks) / data.cache_mb
  RSS MB     peak resident memory of the reader process
  seq/s      delivered sequences per second of wall time (after --warmup steps)
  seq/cpu-s  sequences per CPU second of the reader process (what one core delivers)
  x demand   seq/s / the sequences per second one H100 consumes at 55 % MFU training
             BERT-base at seq 512 (models/flops.py); x cpu the same per CPU second

The emulator answers one request at a time, in Python, on the same machine: the wall
numbers are a floor for real GCS, the per-CPU-second ones the pipeline's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

MB = 1 << 20
REPO = pathlib.Path(__file__).resolve().parents[1]
H100_PEAK, MFU = 989e12, 0.55  # engine/hardware.py's H100 (SXM) bf16 peak; the MFU goal
SERVER = ('import sys, time; from tests.fake_gcs import fake_gcs\n'
          'with fake_gcs() as url:\n'
          '    import os; print(os.environ["STORAGE_EMULATOR_HOST"], flush=True)\n'
          '    sys.stdin.read()\n')


def demand_seq_per_s(seq_len: int = 512) -> float:
    """Sequences per second one H100 at 55 % MFU trains BERT-base on (configs' base)."""
    from engine.config_cli import load_config
    from models.flops import train_flops_per_step
    from pretrain.sections import bert_config, masking_config
    cfg = load_config(f'{REPO}/configs/pretrain.py:base')
    cfg.seq_len = seq_len
    masked = masking_config(cfg, cfg.model.vocab_size).max_predictions
    return H100_PEAK * MFU / train_flops_per_step(bert_config(cfg), 1, seq_len, masked)


def write_corpus(directory: pathlib.Path, size_mb: float, seq_len: int) -> None:
    """A prepared directory of random packed sequences (a [SEP] every ~100 tokens)."""
    from text import records
    rng = np.random.default_rng(0)
    n = int(size_mb * MB) // (2 * seq_len)
    shards, unit = [], 0
    for start in range(0, n, records.RECORDS_PER_FILE):
        rows = min(records.RECORDS_PER_FILE, n - start)
        ids = rng.integers(5, 30000, (rows, seq_len), dtype=np.int32)
        ids[rng.random((rows, seq_len)) < 0.01] = 3  # [SEP]
        writer = records.ShardWriter(str(directory), 'train', unit)
        writer.write_rows(ids, 'uint16')
        shards += writer.close()
        unit += 1
    totals = {'sequences': n, 'documents': n, 'tokens': n * seq_len}
    index = records.Index(seq_len, 'uint16', {'train': shards, 'validation': []},
                          {'train': totals, 'validation': dict.fromkeys(totals, 0)},
                          f'bench-{size_mb:g}mb-{seq_len}', {})
    records.write_index(directory, index)


def upload(directory: pathlib.Path, url: str) -> None:
    from etils import epath
    for path in directory.iterdir():
        (epath.Path(url) / path.name).write_bytes(path.read_bytes())


def disk_usage(directory: str) -> int:
    """Bytes on disk of a directory's files (read-ahead threads may evict some meanwhile)."""
    total = 0
    for entry in os.scandir(directory) if os.path.isdir(directory) else ():
        try:
            total += entry.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def worker(args) -> dict:
    """One reader process: its batches from the bucket, measured."""
    import logging
    logging.getLogger('gcsfs').setLevel(logging.ERROR)  # the emulator has no bucket type
    from pretrain import data
    from text.batches import PretrainBatches
    split = data.open_split(args.url, 'train', args.cache_mb, args.block)
    batches = PretrainBatches(split, args.batch_size, 0, args.process, 2,
                              read_block=args.block)
    # Bytes and range reads per step, exactly: the same batches without read-ahead or cache.
    plain = data.open_split(args.url, 'train', 0, args.block)
    counted = PretrainBatches(plain, args.batch_size, 0, args.process, 2, read_block=args.block)
    for step in range(args.steps):
        counted.batch(step)
    it = batches.iterate(0)
    for _ in range(args.warmup):
        next(it)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        next(it)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rows = args.steps * batches.local_batch_size
    directory = split.cache.directory if split.cache else ''
    return {'block': args.block, 'process': args.process,
            'bytes_per_share': plain.bytes_read / (rows * split.layout.record_bytes),
            'ranges_per_step': plain.ranges_read / args.steps,
            'cache_mb': disk_usage(directory) / MB,
            'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            'seq_s': rows / wall, 'seq_cpu_s': rows / cpu}


def run(args) -> list[dict]:
    import logging
    logging.getLogger('gcsfs').setLevel(logging.ERROR)
    work = pathlib.Path(tempfile.mkdtemp(prefix='bucket-bench-'))
    server = subprocess.Popen([sys.executable, '-c', SERVER], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        host = server.stdout.readline().strip()
        env = dict(os.environ, STORAGE_EMULATOR_HOST=host, JAX_PLATFORMS='cpu')
        os.environ.update(STORAGE_EMULATOR_HOST=host)
        local = work / 'corpus'
        local.mkdir()
        write_corpus(local, args.size_mb, args.seq_len)
        url = 'gs://bucket/prepared'
        upload(local, url)
        rows = []
        for block in args.read_block:
            procs = [subprocess.Popen(
                [sys.executable, '-m', 'pretrain.bucket_bench', '--worker', str(i), '--url', url,
                 '--block', str(block), '--steps', str(args.steps), '--warmup',
                 str(args.warmup), '--batch-size', str(args.batch_size), '--cache-mb',
                 str(args.cache_mb)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                env=dict(env, BERTJAX_CACHE=str(work / f'cache-{block}-{i}')))  # two hosts' disks
                for i in range(2)]
            for proc in procs:
                out, _ = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f'a reader failed (exit {proc.returncode})')
                rows.append(json.loads(out.strip().splitlines()[-1]))
        return rows
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def format_table(rows: list[dict], demand: float, cache_mb: float) -> str:
    head = ('block', 'proc', 'B/step', 'ranges', 'cache MB', 'RSS MB', 'seq/s', 'seq/cpu-s',
            'x demand', 'x cpu')
    lines = [' | '.join(head)]
    for r in rows:
        lines.append(' | '.join([
            str(r['block']), str(r['process']), f'{r["bytes_per_share"]:.2f}',
            f'{r["ranges_per_step"]:.1f}', f'{r["cache_mb"]:.1f} / {cache_mb:g}',
            f'{r["rss_mb"]:.0f}', f'{r["seq_s"]:.0f}', f'{r["seq_cpu_s"]:.0f}',
            f'{r["seq_s"] / demand:.2f}', f'{r["seq_cpu_s"] / demand:.2f}']))
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size-mb', type=float, default=64.0)
    parser.add_argument('--cache-mb', type=float, default=16.0)
    parser.add_argument('--seq-len', type=int, default=512)
    parser.add_argument('--batch-size', type=int, default=256, help='global batch (2 hosts)')
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--read-block', type=int, action='append')
    parser.add_argument('--worker', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--url', help=argparse.SUPPRESS)
    parser.add_argument('--block', type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        args.process = args.worker
        print(json.dumps(worker(args)), flush=True)
        return 0
    args.read_block = args.read_block or [1, 32]
    demand = demand_seq_per_s(args.seq_len)
    rows = run(args)
    print(f'corpus {args.size_mb:g} MB in the bucket, cache {args.cache_mb:g} MB per process, '
          f'global batch {args.batch_size} over 2 processes, seq {args.seq_len}; demand of one '
          f'H100 at 55 % MFU (BERT-base): {demand:.0f} sequences/s')
    print(format_table(rows, demand, args.cache_mb))
    return 0


if __name__ == '__main__':
    sys.exit(main())
