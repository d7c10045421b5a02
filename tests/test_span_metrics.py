"""Span F1 against seqeval's definition, EM / F1 against the SQuAD v1.1 script."""

import numpy as np
import pytest

from finetune import span_metrics as sm


def test_seqeval_readme_example():
    # seqeval's README: f1 0.50, accuracy 0.80 (MISC starts one word early, PER is right).
    gold = [['O', 'O', 'O', 'B-MISC', 'I-MISC', 'I-MISC', 'O'], ['B-PER', 'I-PER', 'O']]
    pred = [['O', 'O', 'B-MISC', 'I-MISC', 'I-MISC', 'I-MISC', 'O'], ['B-PER', 'I-PER', 'O']]
    got = sm.token_metrics(gold, pred)
    assert (got['precision'], got['recall'], got['f1']) == (0.5, 0.5, 0.5)
    assert got['accuracy'] == pytest.approx(0.8)
    assert got['spans'] == 2 and got['words'] == 10


def test_entities_as_seqeval_reads_them():
    # seqeval docs: get_entities(['B-PER', 'I-PER', 'O', 'B-LOC']) -> PER 0..1, LOC 3..3
    assert sm.entities(['B-PER', 'I-PER', 'O', 'B-LOC']) == [('PER', 0, 1), ('LOC', 3, 3)]
    # conlleval's lenient reading: an I- after O starts a span; a type change splits one
    assert sm.entities(['O', 'I-PER', 'I-PER', 'I-LOC']) == [('PER', 1, 2), ('LOC', 3, 3)]
    assert sm.entities(['B-PER', 'B-PER']) == [('PER', 0, 0), ('PER', 1, 1)]
    assert sm.entities(['S-LOC', 'B-ORG', 'E-ORG', 'O']) == [('LOC', 0, 0), ('ORG', 1, 2)]
    assert sm.entities(['O', 'O']) == []


def test_random_tag_sequences_match_seqeval():
    seqeval = pytest.importorskip('seqeval.metrics')
    rng = np.random.default_rng(0)
    tags = ['O', 'B-PER', 'I-PER', 'B-LOC', 'I-LOC', 'E-LOC', 'S-ORG', 'I-ORG']
    for _ in range(20):
        lengths = rng.integers(1, 12, size=8)
        gold = [list(rng.choice(tags, n)) for n in lengths]
        pred = [list(rng.choice(tags, n)) for n in lengths]
        got = sm.token_metrics(gold, pred)
        assert got['f1'] == pytest.approx(seqeval.f1_score(gold, pred))
        assert got['precision'] == pytest.approx(seqeval.precision_score(gold, pred))
        assert got['recall'] == pytest.approx(seqeval.recall_score(gold, pred))
        assert got['accuracy'] == pytest.approx(seqeval.accuracy_score(gold, pred))


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match='sentence 0: 2 gold tags but 1 predicted'):
        sm.token_metrics([['O', 'O']], [['O']])


def test_squad_normalisation():
    assert sm.normalize_answer('The  Quick, brown fox!') == 'quick brown fox'
    assert sm.normalize_answer('an Apple a day') == 'apple day'
    assert sm.normalize_answer('theater') == 'theater'  # whole words only
    assert sm.normalize_answer("Denver's") == 'denvers'  # punctuation goes, letters join


def test_squad_exact_match_and_f1_by_hand():
    assert sm.exact_match('the Broncos', 'Broncos.') == 1.0
    assert sm.exact_match('Denver Broncos', 'Broncos') == 0.0
    # pred [cat, sat], gold [cat, sat, down]: precision 1, recall 2/3 -> F1 0.8
    assert sm.answer_f1('the cat sat', 'a cat sat down') == pytest.approx(0.8)
    assert sm.answer_f1('dog', 'cat') == 0.0
    assert sm.answer_f1('', 'cat') == 0.0
    # a repeated word counts as often as both have it: pred [x, x], gold [x]
    assert sm.answer_f1('x x', 'x') == pytest.approx(2 * 0.5 * 1 / 1.5)
    got = sm.squad_metrics(['Broncos', 'in 1990', 'nothing'],
                           [['Denver Broncos', 'Broncos'], ['1990'], ['something']])
    # EM: 1, 0, 0; F1: 1, 2*(1/2*1)/(1.5) = 2/3, 0
    assert got['exact_match'] == pytest.approx(1 / 3)
    assert got['f1'] == pytest.approx((1 + 2 / 3) / 3)
    assert got['questions'] == 3
