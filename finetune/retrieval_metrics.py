"""Evaluation of embeddings on the host, in numpy: retrieval, kNN and a logistic probe.

Retrieval: each query has exactly one relevant document of the corpus; documents are ranked
by cosine similarity. A document scoring the same as the relevant one ranks before it
(ties count against the query: a constant scorer gets no credit). With rank r of the
relevant document: recall@k = mean(r <= k); MRR@10 = mean(1/r if r <= 10 else 0), as
sentence-transformers' InformationRetrievalEvaluator reports it; nDCG@10 = mean(1/log2(r+1)
if r <= 10 else 0) (one relevant document: the ideal DCG is 1).
"""

from __future__ import annotations

import numpy as np

RECALL_AT = (1, 5, 10)
METRIC_DIRECTIONS = {'mrr@10': 'max', 'ndcg@10': 'max',
                     **{f'recall@{k}': 'max' for k in RECALL_AT}}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ranks_of_relevant(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of document relevant[i] in row i of `scores` (Q, D), ties against it."""
    scores = np.asarray(scores, np.float64)
    relevant = np.asarray(relevant, np.int64)
    if scores.ndim != 2 or relevant.shape != (scores.shape[0],):
        raise ValueError(f'scores {scores.shape} and relevant {relevant.shape}: expected '
                         '(Q, D) and (Q,)')
    own = scores[np.arange(len(relevant)), relevant][:, None]
    return (scores >= own).sum(axis=1)  # the relevant document itself counts once


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks, np.float64)
    top10 = ranks <= 10
    out = {f'recall@{k}': float(np.mean(ranks <= k)) for k in RECALL_AT}
    out['mrr@10'] = float(np.mean(np.where(top10, 1.0 / ranks, 0.0)))
    out['ndcg@10'] = float(np.mean(np.where(top10, 1.0 / np.log2(ranks + 1.0), 0.0)))
    return out


def retrieval_metrics(queries: np.ndarray, documents: np.ndarray,
                      relevant: np.ndarray) -> dict[str, float]:
    """recall@1/5/10, MRR@10 and nDCG@10 of cosine retrieval; `relevant[i]` is the row of
    `documents` that answers query i."""
    return metrics_from_ranks(ranks_of_relevant(_unit(queries) @ _unit(documents).T, relevant))


def dedupe_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the first occurrence of each distinct row, each row's distinct id): the same
    positive twice is one document of the corpus, relevant to both of its queries."""
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # documents in the order they first appear
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return first[order], remap[inverse.reshape(-1)]


def knn_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                 test_labels: np.ndarray, k: int = 10) -> float:
    """Accuracy of a cosine k-nearest-neighbour vote (each neighbour's vote weighted by its
    similarity; a tie goes to the smaller class id)."""
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    k = min(k, len(train_labels))
    sims = _unit(test) @ _unit(train).T
    top = np.argsort(-sims, axis=1, kind='stable')[:, :k]
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = np.zeros((len(test_labels), classes))
    np.add.at(votes, (np.arange(len(test_labels))[:, None], train_labels[top]),
              np.take_along_axis(sims, top, axis=1))
    return float(np.mean(votes.argmax(axis=1) == test_labels))


def logistic_probe(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                   test_labels: np.ndarray, c: float = 1.0) -> float:
    """Test accuracy of scikit-learn's L2 logistic regression on standardised frozen
    embeddings (scikit-learn is an optional extra; imported here only)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    probe.fit(np.asarray(train, np.float64), train_labels)
    return float(np.mean(probe.predict(np.asarray(test, np.float64)) == test_labels))
