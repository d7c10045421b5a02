"""The practitioner baselines of docs/tokens_qa.md (studies/span_study.py)."""

import pytest

from finetune import qa, tokens
from studies import span_study


def test_majority_tag_per_word_and_most_frequent_tag_for_unseen_words():
    train = tokens.TokenExamples([['a', 'b', 'a'], ['a', 'c']],
                                 [['X', 'Y', 'X'], ['Z', 'Y']], [1, 5])
    test = tokens.TokenExamples([['a', 'c', 'new']], None, [1])
    # 'a' is X twice and Z once; 'new' was never seen: Y and X tie at 2, first seen wins
    assert span_study.majority_tags(train, test) == [['X', 'Y', 'X']]


def test_tfidf_picker_answers_from_the_closest_sentence():
    pytest.importorskip('sklearn')
    context = ('The river flows north past the mill. Kalo built the mill in 1820. '
               'The town has a market.')
    ex = qa.QAExamples(['q'], ['When did Kalo build the mill?'], [context], [['1820']], [-1],
                       [''])
    # the second sentence shares 'Kalo', 'the', 'mill'; of its runs of words the question
    # lacks ('built', 'in 1820.') the longest is the answer
    assert span_study.tfidf_answers(ex, ex) == ['in 1820.']
