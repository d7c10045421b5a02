"""The lexical baselines of the embedding study: BM25 against hand-computed scores and
rank_bm25 (where installed)."""

import math

import numpy as np
import pytest

from studies import embed_bench


def test_bm25_matches_hand_computed_scores():
    docs = [['a', 'b'], ['a', 'c', 'c'], ['d']]
    scores = embed_bench.bm25_scores([['c'], ['a'], ['zzz']], docs)
    idf = math.log(2.5 / 1.5)  # b, c, d: in 1 of 3 documents
    floor = 0.25 * (math.log(1.5 / 2.5) + 3 * idf) / 4  # 'a' (2 of 3) has a negative idf
    assert scores[0, 1] == pytest.approx(idf * 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 1.5)))
    assert scores[0, 0] == scores[0, 2] == 0.0
    assert scores[1, 0] == pytest.approx(floor * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 1.0)))
    assert not scores[2].any()  # an unknown word scores nothing


def test_bm25_agrees_with_rank_bm25():
    rank_bm25 = pytest.importorskip('rank_bm25')
    rng = np.random.default_rng(0)
    vocab = [f'w{i}' for i in range(30)]
    docs = [list(rng.choice(vocab, size=rng.integers(3, 12))) for _ in range(40)]
    queries = [list(rng.choice(vocab, size=3)) for _ in range(5)]
    theirs = rank_bm25.BM25Okapi(docs)
    np.testing.assert_allclose(embed_bench.bm25_scores(queries, docs),
                               [theirs.get_scores(q) for q in queries], rtol=1e-9)


def test_lexical_retrieval_ranks_the_matching_paragraph_first():
    pairs = [('lobster life cycle', 'the lobster eggs hatch'), ('poet', 'du fu was a poet'),
             ('river', 'the river floods')]
    for row in embed_bench.lexical_retrieval(pairs).values():
        assert row['recall@1'] == 1.0
