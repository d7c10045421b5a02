"""Tokenizer: fixed special ids, round trips, training, reuse and validation."""

import os
import random

import numpy as np
import pytest
import sentencepiece as spm

from text import tokenizer as tk

VOCAB = 200


def make_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Sentences over ~200 made-up words: enough distinct pieces for a 200-piece vocab."""
    rng = random.Random(seed)
    syllables = ['ka', 'lo', 'mi', 'ter', 'sun', 'ra', 'ven', 'do', 'pi', 'nor', 'gal', 'shu',
                 'bex', 'tra', 'quo', 'fen']
    words = sorted({''.join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
                    for _ in range(260)})
    return [' '.join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + '.'
            for _ in range(n)]


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> tk.Tokenizer:
    path = tmp_path_factory.mktemp('tok') / 'spm.model'
    return tk.train_tokenizer(make_sentences(), str(path), VOCAB)


def test_special_ids_are_fixed(trained):
    assert trained.vocab_size == VOCAB
    assert [trained.id_to_piece(i) for i in range(5)] == list(tk.SPECIAL_PIECES)
    assert (tk.PAD_ID, tk.UNK_ID, tk.CLS_ID, tk.SEP_ID, tk.MASK_ID) == (0, 1, 2, 3, 4)
    ids = trained.encode(make_sentences(1, seed=5)[0])
    assert ids and min(ids) > tk.MASK_ID  # plain text never produces a special id


def test_round_trip(trained):
    sentences = make_sentences(5, seed=1)
    batch = trained.encode_batch(sentences)
    for text, ids in zip(sentences, batch, strict=True):
        assert ids == trained.encode(text)
        assert trained.decode(ids) == text
        # Special tokens are dropped when decoding.
        assert trained.decode([tk.CLS_ID, *ids, tk.SEP_ID, tk.PAD_ID]) == text


def test_word_start_mask(trained):
    mask = trained.word_start_mask()
    assert mask.shape == (trained.vocab_size,) and mask.dtype == np.bool_
    assert mask[:5].all()
    pieces = [trained.id_to_piece(i) for i in range(5, trained.vocab_size)]
    assert mask[5:].tolist() == [p.startswith('\u2581') for p in pieces]
    ids = trained.encode('Kalo mi tersun')
    assert mask[ids[0]]  # the first piece of a text starts a word
    assert mask[ids].sum() == 3  # one start per word


def test_training_is_deterministic(tmp_path, trained):
    again = tk.train_tokenizer(make_sentences(), str(tmp_path / 'again.model'), VOCAB)
    with open(trained.path, 'rb') as a, open(again.path, 'rb') as b:
        assert a.read() == b.read()
    assert again.fingerprint == trained.fingerprint


def test_bpe_and_small_corpus(tmp_path):
    tok = tk.train_tokenizer(make_sentences(200), str(tmp_path / 'bpe.model'), 150, 'bpe')
    assert tok.vocab_size == 150 and tok.id_to_piece(4) == '[MASK]'
    # The vocabulary size is a soft limit: a tiny corpus gives fewer pieces, not an error.
    small = tk.train_tokenizer(['a b c', 'b c d'] * 5, str(tmp_path / 's.model'), 500)
    assert tk.MASK_ID < small.vocab_size < 500
    assert small.decode(small.encode('a b d')) == 'a b d'


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='tokenizer_type'):
        tk.train_tokenizer(['x'], str(tmp_path / 'x.model'), 100, 'wordpiece')
    with pytest.raises(ValueError, match='vocab_size'):
        tk.train_tokenizer(['x'], str(tmp_path / 'x.model'), 3)
    with pytest.raises(ValueError, match='training text is empty'):
        tk.train_tokenizer([], str(tmp_path / 'x.model'), 100)
    assert not os.path.exists(tmp_path / 'x.model')


def test_rejects_wrong_special_ids(tmp_path):
    # An ordinary spm model: <unk> <s> </s> at 0..2, no [PAD]/[MASK].
    prefix = tmp_path / 'plain'
    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_sentences(200)),
                                   model_prefix=str(prefix), vocab_size=100, minloglevel=2)
    with pytest.raises(ValueError, match=r"plain\.model: id 0 is '<unk>', expected '\[PAD\]'"):
        tk.Tokenizer(f'{prefix}.model')
    (tmp_path / 'junk.model').write_bytes(b'not a model')
    with pytest.raises(ValueError, match='junk.model'):
        tk.Tokenizer(str(tmp_path / 'junk.model'))
    with pytest.raises(ValueError, match='missing.model'):
        tk.Tokenizer(str(tmp_path / 'missing.model'))


def test_load_or_train_reuses_existing(tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return make_sentences(300)

    first = tk.load_or_train_tokenizer(str(tmp_path), texts, 120, 'unigram')
    assert first.path == str(tmp_path / 'spm.model') and len(calls) == 1
    before = (tmp_path / 'spm.model').read_bytes()
    mtime = os.stat(tmp_path / 'spm.model').st_mtime_ns
    second = tk.load_or_train_tokenizer(str(tmp_path), texts, 999, 'bpe')  # args ignored
    assert len(calls) == 1  # not retrained
    assert (tmp_path / 'spm.model').read_bytes() == before
    assert os.stat(tmp_path / 'spm.model').st_mtime_ns == mtime
    assert second.vocab_size == first.vocab_size


def test_load_or_train_with_model_file(tmp_path, trained):
    work = tmp_path / 'run'

    def no_training():
        raise AssertionError('must not train when model_file is given')

    tok = tk.load_or_train_tokenizer(str(work), no_training, 50, 'unigram', trained.path)
    assert tok.path == str(work / 'spm.model')
    assert (work / 'spm.model').read_bytes() == open(trained.path, 'rb').read()
    # Loading it again from the workdir copy itself is fine too.
    assert tk.load_or_train_tokenizer(str(work), no_training, 50, 'unigram',
                                      str(work / 'spm.model')).vocab_size == VOCAB
    with pytest.raises(ValueError, match='data.tokenizer_model'):
        tk.load_or_train_tokenizer(str(work), no_training, 50, 'unigram', str(tmp_path / 'no'))
