"""The embedding study of docs/embeddings.md: retrieval and a probe, encoders vs lexical.

    python -m studies.embed_bench --encoder runs/encoder --encoder-step 5000 \
        --workdir runs/embed_bench

Retrieval: WikiText-2's test-split (title: section, first paragraph) pairs (text/wiki_pairs.py;
derived here, not a published benchmark): each query ranks all test paragraphs.
Probe: the bench's TREC question types (text/tasks.py): a logistic probe and a 10-NN vote
on frozen features (embeddings, or TF-IDF vectors), trained on its train split, scored on
its test split.
Systems: TF-IDF cosine and BM25 (Okapi, rank_bm25's BM25Okapi formula, written here) on
lowercased word tokens; the encoder's raw mean-pooled embeddings; and the encoder
fine-tuned contrastively (configs/finetune.py:embed on the train-split pairs, validation
pairs choosing the checkpoint), one run per seed. Writes WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import re
from collections import Counter

import numpy as np

from engine.config_cli import apply_overrides, load_config
from finetune import embed_cmd, encoding, retrieval_metrics
from finetune.data import Examples
from text import tasks, wiki_pairs
from text.tokenizer import load_tokenizer

SEQ_LEN = 64
_WORD = re.compile(r'\w+')


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bm25_scores(queries: list[list[str]], documents: list[list[str]], k1: float = 1.5,
                b: float = 0.75, epsilon: float = 0.25) -> np.ndarray:
    """(Q, D) Okapi BM25 scores as rank_bm25's BM25Okapi: idf = ln((N - n + 0.5) / (n +
    0.5)), a negative idf floored to epsilon * the mean idf; a term's weight idf * tf * (k1
    + 1) / (tf + k1 * (1 - b + b * |d| / avgdl))."""
    n_docs = len(documents)
    lengths = np.array([len(d) for d in documents], np.float64)
    avgdl = lengths.mean()
    df = Counter(t for d in documents for t in set(d))
    idf = {t: math.log((n_docs - n + 0.5) / (n + 0.5)) for t, n in df.items()}
    floor = epsilon * (sum(idf.values()) / len(idf))
    idf = {t: v if v >= 0 else floor for t, v in idf.items()}
    counts = [Counter(d) for d in documents]
    norm = k1 * (1 - b + b * lengths / avgdl)
    scores = np.zeros((len(queries), n_docs))
    for qi, query in enumerate(queries):
        for term in query:
            if term not in idf:
                continue
            tf = np.array([c.get(term, 0) for c in counts], np.float64)
            scores[qi] += idf[term] * tf * (k1 + 1) / (tf + norm)
    return scores


def tfidf_vectors(fit: list[str], *others: list[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer
    vectorizer = TfidfVectorizer(lowercase=True, sublinear_tf=True)
    return [vectorizer.fit_transform(fit), *(vectorizer.transform(o) for o in others)]


def lexical_retrieval(pairs: list[tuple[str, str]]) -> dict[str, dict]:
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    relevant = np.arange(len(pairs))
    bm25 = bm25_scores([words(q) for q in queries], [words(d) for d in docs])
    doc_vecs, query_vecs = tfidf_vectors(docs, queries)
    tfidf = (query_vecs @ doc_vecs.T).toarray()
    return {name: retrieval_metrics.metrics_from_ranks(
        retrieval_metrics.ranks_of_relevant(scores, relevant))
        for name, scores in (('tfidf', tfidf), ('bm25', bm25))}


def encoder_vectors(workdir: str, texts: list[str], step: int | None = None) -> np.ndarray:
    model, params, _ = embed_cmd.load_encoder(pathlib.Path(workdir).absolute(), step)
    tokenizer = load_tokenizer(str(pathlib.Path(workdir) / 'spm.model'))
    encoded = encoding.encode(tokenizer, Examples(texts, None, np.zeros(len(texts), np.int32)),
                              SEQ_LEN)
    return embed_cmd.embed_all(model, params, encoded, 64)


def probe_scores(train: np.ndarray, train_labels, test: np.ndarray, test_labels) -> dict:
    return {'probe_accuracy': retrieval_metrics.logistic_probe(train, train_labels, test,
                                                               test_labels),
            'knn_accuracy': retrieval_metrics.knn_accuracy(train, train_labels, test,
                                                           test_labels, k=10)}


def probe_task() -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    import csv
    paths = tasks.bench_split('trec')
    rows = {s: list(csv.DictReader(open(paths[s], encoding='utf-8'))) for s in ('train', 'test')}
    names = sorted({r['label'] for r in rows['train']})
    ids = {n: i for i, n in enumerate(names)}
    return ([r['text'] for r in rows['train']], np.array([ids[r['label']] for r in rows['train']]),
            [r['text'] for r in rows['test']], np.array([ids[r['label']] for r in rows['test']]))


def encoder_row(workdir: str, pairs, probe, step: int | None = None) -> dict:
    vectors = functools.partial(encoder_vectors, workdir, step=step)
    queries, docs = vectors([q for q, _ in pairs]), vectors([d for _, d in pairs])
    row = retrieval_metrics.retrieval_metrics(queries, docs, np.arange(len(pairs)))
    train_x, train_y, test_x, test_y = probe
    row.update(probe_scores(vectors(train_x), train_y, vectors(test_x), test_y))
    return row


def finetune(encoder: str, step: int, workdir: pathlib.Path, seed: int, extra: list[str]
             ) -> str:
    """One contrastive fine-tuning run (finetune.train.run, as the suites call it)."""
    from finetune import train
    run = workdir / f'contrastive-seed{seed}'
    cfg = load_config('configs/finetune.py:embed')
    apply_overrides(cfg, [f'init_from={encoder}', f'init_step={step}', f'seed={seed}',
                          f'seq_len={SEQ_LEN}', 'num_epochs=3',
                          *(item.removeprefix('--config.') for item in extra)])
    train.run(cfg, str(run))
    return str(run)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--encoder', required=True, help='the pretraining workdir')
    parser.add_argument('--workdir', required=True, help='where runs and results.json go')
    parser.add_argument('--encoder-step', type=int, required=True,
                        help='its checkpoint step; every row uses the same one')
    parser.add_argument('--seeds', default='0,1,2')
    parser.add_argument('--extra', default='', help='more --config.KEY=VALUE, space-separated')
    args = parser.parse_args(argv)
    out = pathlib.Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / 'results.json'
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    pairs = wiki_pairs.wikitext_pairs('test')
    probe = probe_task()

    def save(name, row):
        results[name] = row
        results_file.write_text(json.dumps(results, indent=2) + '\n')
        print(name, json.dumps(row), flush=True)

    if 'bm25' not in results:
        lexical = lexical_retrieval(pairs)
        train_v, test_v = tfidf_vectors(probe[0], probe[2])
        save('tfidf', {**lexical['tfidf'], **probe_scores(train_v.toarray(), probe[1],
                                                          test_v.toarray(), probe[3])})
        save('bm25', lexical['bm25'])
    step = args.encoder_step
    if 'raw' not in results:
        save('raw', {**encoder_row(args.encoder, pairs, probe, step), 'encoder_step': step})
    for seed in (int(s) for s in args.seeds.split(',') if s):
        if f'contrastive-seed{seed}' not in results:
            run = finetune(args.encoder, step, out, seed, args.extra.split())
            save(f'contrastive-seed{seed}', encoder_row(run, pairs, probe))


if __name__ == '__main__':
    main()
