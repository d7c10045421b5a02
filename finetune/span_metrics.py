"""Metrics of the per-token tasks, on the host in plain Python.

Token classification: entity spans as seqeval (Nakayama 2018) reads them in its default
mode (conlleval's: an I- after O or after another type starts a span; IOB2, IOB1, IOE and
IOBES tags all read), micro precision / recall / F1 over (type, first, last) spans of all
sentences, and per-word accuracy.

Extractive QA: exact match and F1 as the official SQuAD v1.1 evaluation script computes
them (answers normalised: lowercased, punctuation and the articles a/an/the removed,
whitespace collapsed; F1 over the bag of normalised words; each the best over the gold
answers of a question), as fractions (the script prints 100x these).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

Span = tuple[str, int, int]  # (type, first, last) word indices, inclusive


def _split(tag: str) -> tuple[str, str]:
    """seqeval's reading: ('B', 'PER') of 'B-PER'; 'O' is ('O', '_')."""
    return tag[:1], tag[1:].split('-', maxsplit=1)[-1] or '_'


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ('E', 'S'):
        return True
    if prev_tag in ('B', 'I') and tag in ('B', 'S', 'O'):
        return True
    return prev_tag not in ('O', '.') and prev_type != type_


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ('B', 'S'):
        return True
    if prev_tag in ('E', 'S', 'O') and tag in ('E', 'I'):
        return True
    return tag not in ('O', '.') and prev_type != type_


def entities(tags: Sequence[str]) -> list[Span]:
    """The spans of one sentence's tags, in order (seqeval.metrics.sequence_labeling
    .get_entities, default mode)."""
    spans, prev_tag, prev_type, begin = [], 'O', '', 0
    for i, chunk in enumerate([*tags, 'O']):
        tag, type_ = _split(chunk)
        if _ends(prev_tag, tag, prev_type, type_):
            spans.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return spans


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def token_metrics(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """{'precision', 'recall', 'f1'} of entity spans (micro over all sentences), 'accuracy'
    of words, and the counts, of gold and predicted tag sequences (one list per sentence)."""
    if len(gold) != len(pred):
        raise ValueError(f'{len(gold)} gold sentences but {len(pred)} predicted')
    true_spans = pred_spans = correct = words = right = 0
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f'sentence {i}: {len(g)} gold tags but {len(p)} predicted')
        gs, ps = set(entities(g)), set(entities(p))
        true_spans, pred_spans, correct = true_spans + len(gs), pred_spans + len(ps), \
            correct + len(gs & ps)
        words += len(g)
        right += sum(a == b for a, b in zip(g, p, strict=True))
    precision, recall = _ratio(correct, pred_spans), _ratio(correct, true_spans)
    return {'precision': precision, 'recall': recall,
            'f1': _ratio(2 * precision * recall, precision + recall),
            'accuracy': _ratio(right, words), 'spans': true_spans, 'words': words}


# ---------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r'\b(a|an|the)\b')
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The SQuAD v1.1 script's normalize_answer."""
    text = ''.join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return ' '.join(_ARTICLES.sub(' ', text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def answer_f1(prediction: str, gold: str) -> float:
    """F1 over the normalised words of one prediction and one gold answer."""
    ours, theirs = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(ours) & collections.Counter(theirs)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(ours), same / len(theirs)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
    """{'exact_match', 'f1', 'questions'}: means over questions of the best score against
    any of its gold answers."""
    if len(predictions) != len(golds):
        raise ValueError(f'{len(predictions)} predictions for {len(golds)} questions')
    if not predictions:
        return {'exact_match': 0.0, 'f1': 0.0, 'questions': 0}
    em = sum(max(exact_match(p, g) for g in gs) for p, gs in zip(predictions, golds,
                                                                  strict=True))
    f1 = sum(max(answer_f1(p, g) for g in gs) for p, gs in zip(predictions, golds,
                                                                strict=True))
    n = len(predictions)
    return {'exact_match': em / n, 'f1': f1 / n, 'questions': n}
