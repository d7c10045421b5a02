"""Tokenized corpus (TFDS array_record without TensorFlow), packing and batches."""

import glob
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pretrain import data
from pretrain import tokenizer as tk
from tests.helpers import make_sentences, small_tokenizer


@pytest.fixture(scope='module')
def tok(tmp_path_factory) -> tk.Tokenizer:
    return small_tokenizer(tmp_path_factory.mktemp('tok'))


def write_lines(path, lines) -> str:
    path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
    return str(path)


def as_lists(docs) -> list[list[int]]:
    return [d.tolist() for d in docs]


def record_files(data_dir) -> dict[str, int]:
    files = glob.glob(os.path.join(data_dir, data.BUILDER_NAME, '*', '*', '*.array_record*'))
    return {f: os.stat(f).st_mtime_ns for f in files}


def test_build_without_tensorflow_and_hold_out(tmp_path, tok):
    lines = make_sentences(100, seed=3)
    train = write_lines(tmp_path / 'train.txt', lines[:60] + [''] + lines[60:])
    data_dir = str(tmp_path / 'data')
    corpus = data.load_tokenized_corpus([train], None, tok, data_dir, eval_fraction=0.1, seed=0)
    assert 'tensorflow' not in sys.modules
    files = record_files(data_dir)
    assert {os.path.basename(f).split('.')[0] for f in files} == {
        f'{data.BUILDER_NAME}-train', f'{data.BUILDER_NAME}-validation'}
    assert len(corpus['validation']) == 10 and len(corpus['train']) == 90
    expected = as_lists(np.asarray(x, np.int32) for x in tok.encode_batch(lines))
    train_docs, eval_docs = as_lists(corpus['train']), as_lists(corpus['validation'])
    assert [d.dtype for d in corpus['train']][0] == np.int32
    assert not {tuple(d) for d in train_docs} & {tuple(d) for d in eval_docs}
    # Corpus order is kept within each split; together they are the whole corpus.
    assert sorted(train_docs + eval_docs) == sorted(expected)
    assert train_docs == [d for d in expected if d not in eval_docs]
    assert corpus['train'][5].tolist() == train_docs[5]  # random access
    assert corpus['train'][-1].tolist() == train_docs[-1]


def test_cache_reuse_and_rebuild(tmp_path, tok, monkeypatch):
    train = write_lines(tmp_path / 'train.txt', make_sentences(40, seed=4))
    data_dir = str(tmp_path / 'data')
    first = as_lists(data.load_tokenized_corpus(train, None, tok, data_dir)['train'])
    built = record_files(data_dir)

    def no_rebuild(*args, **kwargs):
        raise AssertionError('rebuilt a cached corpus')

    with monkeypatch.context() as m:
        m.setattr(data.BertjaxTokenizedText, '_split_generators', no_rebuild)
        again = data.load_tokenized_corpus([train], None, tok, data_dir)
    assert as_lists(again['train']) == first and record_files(data_dir) == built
    # Another seed or a changed file is another corpus.
    data.load_tokenized_corpus([train], None, tok, data_dir, seed=1)
    with open(train, 'a', encoding='utf-8') as f:
        f.write('Kalo mi.\n')
    grown = data.load_tokenized_corpus([train], None, tok, data_dir)
    assert len(grown['train']) + len(grown['validation']) == 41
    assert len(record_files(data_dir)) == 3 * len(built)
    assert all(record_files(data_dir)[f] == t for f, t in built.items())


def test_eval_files_and_blank_line_docs(tmp_path, tok):
    train = tmp_path / 'train.txt'
    train.write_text('Kalo mi.\nTer sun\n\n\nRa ven.\n\nDo pi.\n', encoding='utf-8')
    evals = write_lines(tmp_path / 'eval.txt', ['Nor gal.', '  ', 'Shu bex.'])
    corpus = data.load_tokenized_corpus([str(train)], [evals], tok, str(tmp_path / 'd'),
                                        doc_separator='blank_line')
    enc = tok.encode
    assert as_lists(corpus['train']) == [enc('Kalo mi. Ter sun'), enc('Ra ven.'), enc('Do pi.')]
    assert as_lists(corpus['validation']) == [enc('Nor gal.'), enc('Shu bex.')]


def test_bad_inputs(tmp_path, tok):
    one = write_lines(tmp_path / 'one.txt', ['Kalo mi.'])
    with pytest.raises(ValueError, match='data.train_files: no such file'):
        data.load_tokenized_corpus([str(tmp_path / 'nope.txt')], None, tok, str(tmp_path))
    with pytest.raises(ValueError, match='data.eval_fraction'):
        data.load_tokenized_corpus([one], None, tok, str(tmp_path), eval_fraction=0.0)
    with pytest.raises(ValueError, match='at least 2'):
        data.load_tokenized_corpus([one], None, tok, str(tmp_path / 'd'))
    with pytest.raises(ValueError, match="data.train_files: TFDS dataset 'no_such_ds_xyz'"):
        data.load_tokenized_corpus('tfds:no_such_ds_xyz:body', None, tok, str(tmp_path))


class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A locally prepared text dataset, standing in for e.g. tfds:wikipedia offline."""

    VERSION = tfds.core.Version('1.0.0')
    code_path = None  # see BertjaxTokenizedText.code_path

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {'body': tfds.features.Text()}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(0), 'validation': self._generate_examples(1)}

    def _generate_examples(self, part):
        for i, text in enumerate(make_sentences(20, seed=part)):
            yield i, {'body': text}


def test_tfds_text_source(tmp_path, tok, monkeypatch):
    tfds_dir = tmp_path / 'tfds'
    TinyText(data_dir=str(tfds_dir)).download_and_prepare(file_format='array_record')
    monkeypatch.setattr('tensorflow_datasets.core.constants.DATA_DIR', str(tfds_dir))
    corpus = data.load_tokenized_corpus('tfds:tiny_text:body', ['tfds:tiny_text:body'], tok,
                                        str(tmp_path / 'd'))
    assert as_lists(corpus['train']) == tok.encode_batch(make_sentences(20, seed=0))
    assert as_lists(corpus['validation']) == tok.encode_batch(make_sentences(20, seed=1))
    with pytest.raises(ValueError, match="no feature 'text'"):
        data.load_tokenized_corpus('tfds:tiny_text', None, tok, str(tmp_path / 'd'))
    assert 'tensorflow' not in sys.modules


def test_pack_documents():
    docs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    out = data.pack_documents(docs, seq_len=5)
    # Stream: 5 6 7 SEP | 8 SEP 9 10 | SEP, cut into windows of 4 after [CLS].
    np.testing.assert_array_equal(out['input_ids'], [[2, 5, 6, 7, 3],
                                                     [2, 8, 3, 9, 10],
                                                     [2, 3, 0, 0, 0]])
    np.testing.assert_array_equal(out['segment_ids'], [[1, 1, 1, 1, 1],
                                                       [1, 1, 1, 2, 2],
                                                       [1, 1, 0, 0, 0]])
    assert out['input_ids'].dtype == np.int32 and out['segment_ids'].dtype == np.int32
    assert data.padding_fraction(out) == pytest.approx(3 / 15)
    exact = data.pack_documents([np.array([5, 6]), np.array([], np.int32), np.array([7])], 4)
    np.testing.assert_array_equal(exact['input_ids'], [[2, 5, 6, 3], [2, 3, 7, 3]])
    np.testing.assert_array_equal(exact['segment_ids'], [[1, 1, 1, 1], [1, 1, 2, 2]])
    assert data.pack_documents([], 8)['input_ids'].shape == (0, 8)
    with pytest.raises(ValueError, match='seq_len'):
        data.pack_documents(docs, 1)


def make_chunks(n: int, seq_len: int = 3) -> dict[str, np.ndarray]:
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)  # row i holds i
    return {'input_ids': ids, 'segment_ids': np.ones_like(ids)}


def rows(batch) -> list[int]:
    return batch['input_ids'][:, 0].tolist()


def test_batches_pure_and_epochs():
    chunks = make_chunks(10)
    b = data.PretrainBatches(chunks, global_batch_size=4, seed=7)
    assert b.steps_per_epoch == 3
    assert b.batch(0)['input_ids'].shape == (4, 3)
    stream = sum((rows(b.batch(s)) for s in range(10)), [])  # 4 epochs, batches straddle them
    epochs = [stream[i:i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # each chunk once per epoch
    assert len({tuple(e) for e in epochs}) == 4  # a fresh order every epoch
    fresh = data.PretrainBatches(chunks, global_batch_size=4, seed=7)
    for step in (9, 3, 1000):
        assert rows(fresh.batch(step)) == rows(b.batch(step)) == rows(b.batch(step))
    other = data.PretrainBatches(chunks, 4, seed=8)
    assert sum((rows(other.batch(s)) for s in range(3)), []) != stream[:12]
    plain = data.PretrainBatches(chunks, 4, seed=7, shuffle=False)
    assert rows(plain.batch(2)) == [8, 9, 0, 1]


def test_process_shards():
    chunks = make_chunks(13)
    whole = data.PretrainBatches(chunks, global_batch_size=6, seed=3)
    parts = [data.PretrainBatches(chunks, 6, seed=3, process_index=i, process_count=3)
             for i in range(3)]
    for step in range(5):
        shards = [rows(p.batch(step)) for p in parts]
        assert all(len(s) == 2 for s in shards)
        assert sum(shards, []) == rows(whole.batch(step))
    with pytest.raises(ValueError, match='not divisible'):
        data.PretrainBatches(chunks, 6, seed=3, process_index=0, process_count=4)
    with pytest.raises(ValueError, match='empty'):
        data.PretrainBatches(make_chunks(0), 2, seed=0)


def test_iterate_matches_batch():
    b = data.PretrainBatches(make_chunks(11), global_batch_size=4, seed=1)
    it = b.iterate(start_step=5)
    got = [next(it) for _ in range(4)]
    it.close()  # stops the prefetch thread
    assert [s for s, _ in got] == [5, 6, 7, 8]
    for step, batch in got:
        expected = b.batch(step)
        assert all(np.array_equal(batch[k], expected[k]) for k in expected)


def test_eval_batches():
    chunks = make_chunks(10)
    batches = list(data.eval_batches(chunks, batch_size=4))
    assert [x['input_ids'].shape for x in batches] == [(4, 3)] * 3
    assert sum((rows(x) for x in batches), [])[:10] == list(range(10))
    last = batches[-1]
    assert (last['input_ids'][2:] == tk.PAD_ID).all() and (last['segment_ids'][2:] == 0).all()
    halves = [list(data.eval_batches(chunks, 4, process_index=i, process_count=2))
              for i in range(2)]
    for whole, a, b in zip(batches, *halves, strict=True):
        assert rows(a) + rows(b) == rows(whole)
