"""Preparation speed per corpus format, A/B on the same text in one run.

    python -m pretrain.format_bench --size-mb 20 --workdir /tmp/format-bench

The same documents (pretrain.benchmark_data's corpus: the shipped tweets and docstrings,
shuffled and repeated to SIZE MB) are written as .txt, .jsonl.zst and .parquet; one
tokenizer is trained on the text; then each format is prepared (in this process, every
core encoding, a fresh output directory each time) in rounds, the formats interleaved so
drift in a shared machine's load hits them alike, each round also timing raw sentencepiece
(`encode_batch` alone, in memory: the ceiling benchmark_data measures). Printed: per format,
the median over --repeats rounds of text MB/s (the .txt file's size / seconds), its ratio to
.txt and to raw sentencepiece, against the bar of 0.70 of raw sentencepiece.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import time

from pretrain.benchmark_data import MB, build_corpus, raw_spm_mb_per_s, train_shared_tokenizer
from text import prepare
from text.tokenizer import load_tokenizer

FORMATS = ('txt', 'jsonl.zst', 'parquet')
BAR = 0.70  # of raw sentencepiece: the preparation bar of docs/data.md


def write_formats(txt: pathlib.Path) -> dict[str, pathlib.Path]:
    """The .jsonl.zst and .parquet copies of `txt`'s lines (reused when present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    out = {'txt': txt, 'jsonl.zst': txt.with_suffix('.jsonl.zst'),
           'parquet': txt.with_suffix('.parquet')}
    lines = [line.strip() for line in txt.read_text(encoding='utf-8').splitlines()]
    lines = [line for line in lines if line]
    if not out['jsonl.zst'].is_file():
        data = ''.join(json.dumps({'text': line}) + '\n' for line in lines).encode()
        out['jsonl.zst'].write_bytes(zstandard.ZstdCompressor().compress(data))
    if not out['parquet'].is_file():
        pq.write_table(pa.table({'text': lines}), out['parquet'], row_group_size=50_000)
    return out


def time_prepare(path: pathlib.Path, tokenizer, root: pathlib.Path) -> float:
    shutil.rmtree(root, ignore_errors=True)
    spec = prepare.PrepareSpec(train=(str(path),), seq_len=128)
    started = time.perf_counter()
    prepare.prepare(spec, tokenizer, str(root), workers=1, show_progress=False)
    return time.perf_counter() - started


def run(size_mb: float, workdir: pathlib.Path, repeats: int
        ) -> tuple[dict[str, dict], float]:
    """({format: its figures}, raw sentencepiece MB/s), medians over `repeats` rounds."""
    workdir.mkdir(parents=True, exist_ok=True)
    txt = workdir / f'corpus-{size_mb:g}mb.txt'
    text_bytes = build_corpus(txt, size_mb)
    files = write_formats(txt)
    model = workdir / 'spm.model'
    if not model.is_file():
        train_shared_tokenizer(txt, model)
    tokenizer = load_tokenizer(str(model))
    seconds: dict[str, list[float]] = {f: [] for f in FORMATS}
    raw: list[float] = []
    for _ in range(repeats):
        raw.append(raw_spm_mb_per_s(txt, model, repeats=1))
        for fmt in FORMATS:
            seconds[fmt].append(time_prepare(files[fmt], tokenizer, workdir / 'prepared'))
    raw_mb_s = statistics.median(raw)
    rows = {}
    for fmt in FORMATS:
        median = statistics.median(seconds[fmt])
        rows[fmt] = {'seconds': median, 'mb_s': text_bytes / MB / median,
                     'file_mb': files[fmt].stat().st_size / MB}
    for fmt in FORMATS:
        rows[fmt]['ratio'] = rows['txt']['seconds'] / rows[fmt]['seconds']
        rows[fmt]['of_raw'] = rows[fmt]['mb_s'] / raw_mb_s
    return rows, raw_mb_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size-mb', type=float, default=20.0)
    parser.add_argument('--workdir', default='/tmp/format-bench')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args(argv)
    rows, raw = run(args.size_mb, pathlib.Path(args.workdir), max(args.repeats, 1))
    print(f'raw sentencepiece: {raw:.2f} MB/s (median of {args.repeats}); bar: {BAR:.2f} of it')
    print(f'| format | file MB | text MB/s (median of {args.repeats}) | ratio to .txt '
          '| of raw spm | bar |')
    print('|---|---|---|---|---|---|')
    for fmt, row in rows.items():
        verdict = 'met' if row['of_raw'] >= BAR else 'missed'
        print(f"| {fmt} | {row['file_mb']:.1f} | {row['mb_s']:.2f} | {row['ratio']:.2f} "
              f"| {row['of_raw']:.2f} | {verdict} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
