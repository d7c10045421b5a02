"""Faults of the data path: many small files, damaged prepared data, long CSV cells and
lines, wrong encodings, tiny classes and directories as inputs."""

import glob
import logging
import os

import numpy as np
import pytest

import launch
from engine.errors import ConfigError
from finetune import data as ft_data
from finetune import encoding
from tests.helpers import make_sentences, small_tokenizer, tiny_args
from text import corpus, prepare, records, sample
from text import tokenizer as tk
from text.units import Unit, plan_units


@pytest.fixture(scope='module')
def tok(tmp_path_factory) -> tk.Tokenizer:
    return small_tokenizer(tmp_path_factory.mktemp('tok'))


def spec(train, **kw) -> prepare.PrepareSpec:
    kw.setdefault('seq_len', 16)
    kw.setdefault('eval_fraction', 0.1)
    return prepare.PrepareSpec(train=tuple(train), **kw)


def dir_bytes(directory) -> dict[str, bytes]:
    return {f: open(os.path.join(directory, f), 'rb').read()
            for f in sorted(os.listdir(directory)) if not f.startswith('.')}


def all_rows(directory, split) -> np.ndarray:
    source = records.open_split(directory, split)
    return source.read(range(len(source)))['input_ids']


def one_file_per_line(directory, lines) -> list[str]:
    directory.mkdir()
    for i, line in enumerate(lines):
        (directory / f'{i:05d}.txt').write_text(line + '\n')
    return sorted(glob.glob(str(directory / '*.txt')))


# ---------------------------------------------------------------- many small files


def test_many_small_files_pack_as_one_file_does(tmp_path, tok):
    lines = make_sentences(400, seed=4)
    one = tmp_path / 'one.txt'
    one.write_text(''.join(line + '\n' for line in lines))
    many = one_file_per_line(tmp_path / 'many', lines)
    one_dir, one_index = prepare.prepare(spec([str(one)]), tok, str(tmp_path / 'out'))
    many_dir, many_index = prepare.prepare(spec(many), tok, str(tmp_path / 'out'))
    # One unit of 400 files: the same documents in the same order, so the same rows (one
    # sequence per document before: 400 mostly padded sequences, 800 files).
    assert many_index.totals == one_index.totals
    for split in records.SPLITS:
        np.testing.assert_array_equal(all_rows(many_dir, split), all_rows(one_dir, split))
        assert len(many_index.shards[split]) == 1
    # Small units: groups of files about unit_bytes together, a padded row per group only.
    small_dir, small = prepare.prepare(spec(many, unit_bytes=2048), tok, str(tmp_path / 's'))
    groups = len(plan_units(many, (), 'line', 2048))
    assert groups <= one.stat().st_size // 2048 + 1
    assert len(small.shards['train']) == groups
    assert (one_index.sequences('train') <= small.sequences('train')
            <= one_index.sequences('train') + groups)
    assert small.totals['train']['documents'] == one_index.totals['train']['documents']
    again, _ = prepare.prepare(spec(many, unit_bytes=2048), tok, str(tmp_path / 's2'))
    assert dir_bytes(again) == dir_bytes(small_dir)  # deterministic


def test_a_one_file_corpus_keeps_its_units_and_directory(tmp_path, tok):
    path = tmp_path / 'a.txt'
    path.write_text(''.join(line + '\n' for line in make_sentences(300, seed=1)))
    size = path.stat().st_size
    assert plan_units([str(path)], (), 'line', 1 << 20) == [Unit(0, str(path), 0, size, 'train')]
    cut = plan_units([str(path)], (), 'line', 2048)
    assert len(cut) > 1 and not any(u.parts for u in cut)
    assert 'grouped_small_files' not in prepare.make_plan(spec([str(path)]), tok,
                                                          str(tmp_path)).info
    # Files larger than a unit are cut as before; the small ones between them are grouped.
    small = [tmp_path / f's{i}.txt' for i in range(3)]
    for s in small:
        s.write_text('tiny text here\n')
    units = plan_units([str(small[0]), str(small[1]), str(path), str(small[2])], (), 'line',
                       2048)
    assert units[0].parts == ((str(small[0]), 0, 15), (str(small[1]), 0, 15))
    assert [u.source for u in units[1:-1]] == [str(path)] * (len(units) - 2)
    assert units[-1] == Unit(len(units) - 1, str(small[2]), 0, 15, 'train')


def test_killed_preparation_of_grouped_files_resumes_to_the_same_bytes(tmp_path, tok,
                                                                         monkeypatch):
    many = one_file_per_line(tmp_path / 'many', make_sentences(300, seed=5))
    full = spec(many, unit_bytes=1024)
    whole, _ = prepare.prepare(full, tok, str(tmp_path / 'whole'))
    real = prepare.prepare_unit

    def crash_on_third(unit, *args, **kw):
        if unit.number == 2:
            raise KeyboardInterrupt
        return real(unit, *args, **kw)

    monkeypatch.setattr(prepare, 'prepare_unit', crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(full, tok, str(tmp_path / 'part'))
    monkeypatch.setattr(prepare, 'prepare_unit', real)
    resumed, _ = prepare.prepare(full, tok, str(tmp_path / 'part'))
    assert dir_bytes(resumed) == dir_bytes(whole)


# ---------------------------------------------------------------- damaged prepared data


@pytest.fixture
def prepared(tmp_path, tok):
    path = tmp_path / 'a.txt'
    path.write_text(''.join(line + '\n' for line in make_sentences(600, seed=2)))
    run = spec([str(path)], unit_bytes=4096)
    directory, _ = prepare.prepare(run, tok, str(tmp_path / 'out'))
    return run, directory, dir_bytes(directory)


def train_shard(directory: str, unit: int = 1) -> str:
    return os.path.join(directory, records.shard_name('train', unit, 0))


def truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize('damage', [os.unlink, truncate])
def test_a_missing_or_truncated_shard_is_prepared_again(prepared, tok, tmp_path, damage,
                                                        monkeypatch, caplog):
    run, directory, reference = prepared
    damage(train_shard(directory))
    with pytest.raises(ConfigError, match=r'^prepared data .*train-00001-0000\.array_record '
                                          r'is (missing|truncated).*delete that file and rerun'):
        records.open_split(directory, 'train')  # before any training step
    plan = prepare.make_plan(run, tok, str(tmp_path / 'out'))
    with pytest.raises(ConfigError, match=r'train-00001-0000\.array_record is'):
        prepare.reusable_index(plan, repair=False)  # several processes: they only say so
    redone = []
    real = prepare.prepare_unit
    monkeypatch.setattr(prepare, 'prepare_unit',
                        lambda u, *a, **k: (redone.append(u.number), real(u, *a, **k))[1])
    with caplog.at_level(logging.WARNING):
        assert prepare.prepare(run, tok, str(tmp_path / 'out'))[0] == directory
    assert redone == [1]  # the damaged unit only
    assert 'train-00001-0000.array_record is' in caplog.text
    assert dir_bytes(directory) == reference


def test_a_changed_byte_is_one_line_naming_the_file_when_read(prepared):
    _, directory, _ = prepared
    path = train_shard(directory)
    data = bytearray(open(path, 'rb').read())
    for position in range(100, 6000, 499):
        data[position] ^= 0xFF
    open(path, 'wb').write(data)
    split = records.open_split(directory, 'train')  # same size: found when read
    with pytest.raises(ConfigError) as e:
        split.read(range(len(split)))
    assert str(e.value).startswith(f'prepared data {path} is corrupted (Corrupted Riegeli')
    assert 'delete that file and rerun' in str(e.value) and '\n' not in str(e.value)


@pytest.mark.slow
def test_pretraining_on_damaged_data(tmp_path, corpus, capsys):
    """A changed byte: exit 2, one error line naming the file; deleting that file as it
    says and rerunning prepares it again (the same bytes) and the run goes on."""
    workdir = tmp_path / 'run'
    assert launch.main(['pretrain', '--workdir', str(workdir), *tiny_args(corpus, 2)]) == 0
    (path,) = glob.glob(str(workdir / 'data' / '*' / 'train-*.array_record'))
    original = open(path, 'rb').read()
    damaged = bytearray(original)
    for position in range(1000, 20000, 997):
        damaged[position] ^= 0xFF
    open(path, 'wb').write(damaged)
    capsys.readouterr()
    assert launch.main(['pretrain', '--workdir', str(workdir), *tiny_args(corpus, 4)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in err
    assert errors[0].startswith(f'error: prepared data {path} is corrupted')
    os.unlink(path)
    assert launch.main(['pretrain', '--workdir', str(workdir), *tiny_args(corpus, 4)]) == 0
    assert open(path, 'rb').read() == original


# ---------------------------------------------------------------- long cells and lines


def test_a_csv_cell_over_the_csv_field_limit_is_truncated_as_jsonl(tmp_path, tok):
    long_text = ' '.join(make_sentences(20000, seed=3))
    assert len(long_text) > 131_072  # csv's default field_size_limit
    (tmp_path / 't.csv').write_text(f'text,label\n"{long_text}",a\nshort one,b\n')
    (tmp_path / 't.jsonl').write_text(f'{{"text": "{long_text}", "label": "a"}}\n'
                                      '{"text": "short one", "label": "b"}\n')
    for sep, name in ((',', 't.csv'), ('\t', 't.tsv')):
        if name.endswith('.tsv'):
            (tmp_path / name).write_text(f'text\tlabel\n{long_text}\ta\nshort one\tb\n')
        rows = ft_data.read_examples(str(tmp_path / name))
        assert [r['line'] for r in rows] == [2, 3]  # the header is line 1
        jsonl = ft_data.read_examples(str(tmp_path / 't.jsonl'))
        assert [{**r, 'line': 0} for r in rows] == [{**r, 'line': 0} for r in jsonl], sep
    examples = ft_data.Examples([r['text_a'] for r in rows], None, np.array([0, 1], np.int32))
    encoded = encoding.encode(tok, examples, 32)
    assert encoded['attention_mask'][0].all()  # truncated to seq_len, not refused
    assert encoded['input_ids'][0, -1] == tk.SEP_ID


def test_the_tokenizer_trains_on_lines_longer_than_sentencepiece_takes(tmp_path):
    sentences = make_sentences(6000)
    lines = [' '.join(sentences[i:i + 2000]) for i in range(0, 6000, 2000)]
    lines.append('é' * 40_000)  # no space to cut at: cut between characters
    assert min(len(line.encode()) for line in lines) > 1 << 16  # sentencepiece's limit
    trained = tk.train_tokenizer(lines, str(tmp_path / 'spm.model'), 150, 'bpe')
    assert trained.vocab_size == 150  # spm skipped every line: "the training text is empty"
    assert len(trained.encode(lines[0][:200])) < 100
    assert trained.encode('é') != [tk.UNK_ID]


# ---------------------------------------------------------------- encoding, classes, dirs


def test_an_all_latin1_corpus_names_the_encoding(tmp_path, tok):
    path = tmp_path / 'latin1.txt'
    path.write_bytes(''.join(f'café numéro {i}\n' for i in range(50)).encode('latin-1'))
    with pytest.raises(ConfigError, match=r'produced no sequence \(skipped 50 line\(s\) of '
                                          r'invalid UTF-8 .*latin1.txt:1\); .*iconv'):
        prepare.prepare(spec([str(path)]), tok, str(tmp_path / 'out'))
    with pytest.raises(ConfigError, match=r'^data.train_files: no valid UTF-8 text .*iconv'):
        tk.train_tokenizer(sample.sample_texts([str(path)], 'line', 1 << 20),
                           str(tmp_path / 'spm.model'), 150, 'bpe')


def test_a_class_too_small_for_the_validation_carve_out_stays_in_train(tmp_path, caplog):
    n, fraction = 21, 0.2
    k = round(fraction * n)
    # A seed whose carve-out holds out the one 'c4' row (the last).
    seed = next(s for s in range(100)
                if n - 1 in np.random.default_rng(s).choice(n, size=k, replace=False))
    lines = ['text,label'] + [f'row {i},{"ab"[i % 2]}' for i in range(n - 1)] + ['odd one,c4']
    (tmp_path / 't.csv').write_text('\n'.join(lines) + '\n')
    with caplog.at_level(logging.WARNING):
        task = ft_data.load_task(str(tmp_path / 't.csv'), validation_fraction=fraction,
                                 seed=seed)
    assert task['label_names'] == ['a', 'b', 'c4'] and "['c4']" in caplog.text
    assert 'odd one' in task['train'].text_a and len(task['validation']) == k - 1
    (tmp_path / 'two.csv').write_text('text,label\nx,a\ny,b\n')
    with pytest.raises(ValueError, match='every class has too few rows'):
        ft_data.load_task(str(tmp_path / 'two.csv'))


def test_a_directory_as_train_files(tmp_path):
    root = tmp_path / 'corpus'
    (root / 'sub').mkdir(parents=True)
    (root / '.git').mkdir()
    for name in ('b.txt', 'a.txt', 'sub/c.txt', '.hidden', '.git/x'):
        (root / name).write_text('text\n')
    expected = [str(root / n) for n in ('a.txt', 'b.txt', 'sub/c.txt')]
    assert corpus.resolve_text_files(str(root)) == expected
    assert corpus.resolve_text_files(f'{root}/,{root}/a.txt') == expected
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match=r"data.train_files: directory '.*empty' holds no"):
        corpus.resolve_text_files(str(tmp_path / 'empty'))
