"""Corpus formats (text/formats.py): JSONL, .gz/.zst, Parquet prepare to the same sequences
as the same documents in a .txt file; bad records are skipped with file:line or are one
error line; units stay a function of the file; missing libraries name their extra."""

import gzip
import json
import pathlib
import sys

import numpy as np
import pytest

from engine.errors import ConfigError
from tests.helpers import launch, make_sentences, read_metrics, small_tokenizer, tiny_args
from text import formats, prepare, records
from text.units import plan_units

DOCS = make_sentences(400, seed=5)


def _jsonl(docs, field='text') -> bytes:
    rows = []
    for i, d in enumerate(docs):
        obj = {'id': i, 'meta': {'body': d}} if field == 'meta.body' else {'id': i, field: d}
        rows.append(json.dumps(obj))
    return ('\n'.join(rows) + '\n').encode()


def _zst(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor().compress(data)


def _parquet(path, docs, row_group_size=100, column='text'):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({'id': list(range(len(docs))), column: docs}), path,
                   row_group_size=row_group_size)


def _write(tmp_path, name: str, docs) -> str:
    path = tmp_path / name
    if name.endswith('.parquet'):
        _parquet(path, docs)
        return str(path)
    text = ('\n'.join(docs) + '\n').encode()
    data = _jsonl(docs) if '.jsonl' in name else text
    if name.endswith('.gz'):
        data = gzip.compress(data)
    elif name.endswith('.zst'):
        data = _zst(data)
    path.write_bytes(data)
    return str(path)


def _sequences(directory: str) -> dict[str, dict]:
    """Every prepared record of each split, as arrays."""
    index = records.read_index(directory)
    out = {}
    for split in records.SPLITS:
        data = records.PreparedSplit(directory, index, split)
        out[split] = {k: v.tolist() for k, v in data.read(range(len(data))).items()}
    return out


def _prepare(tmp_path, tokenizer, files, root='out', **kw):
    # One unit per file: sequences pack within a unit, and units are cut by input bytes.
    spec = prepare.PrepareSpec(train=tuple(files), seq_len=32, unit_bytes=1 << 20, **kw)
    directory, _ = prepare.prepare(spec, tokenizer, str(tmp_path / root), workers=1,
                                   show_progress=False)
    return directory


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp('spm'))


@pytest.mark.parametrize('name', ['c.jsonl', 'c.txt.gz', 'c.txt.zst', 'c.jsonl.gz',
                                  'c.jsonl.zst', 'c.parquet'])
def test_each_format_prepares_the_sequences_of_the_same_text(tmp_path, tokenizer, name):
    txt = _prepare(tmp_path, tokenizer, [_write(tmp_path, 'c.txt', DOCS)], 'txt')
    other = _prepare(tmp_path, tokenizer, [_write(tmp_path, name, DOCS)], 'other')
    assert other != txt  # another input, another directory
    expected = _sequences(txt)
    assert expected['train'] and expected['validation']
    assert _sequences(other) == expected


def test_nested_field_and_a_changed_field_re_prepares(tmp_path, tokenizer):
    path = tmp_path / 'n.jsonl'
    path.write_bytes(_jsonl(DOCS, 'meta.body'))
    nested = _prepare(tmp_path, tokenizer, [str(path)], text_field='meta.body')
    txt = _prepare(tmp_path, tokenizer, [_write(tmp_path, 'c.txt', DOCS)], 'txt')
    assert _sequences(nested) == _sequences(txt)
    spec = prepare.PrepareSpec(train=(str(path),), seq_len=32, unit_bytes=1 << 20)
    plain = prepare.make_plan(spec, tokenizer, str(tmp_path / 'out'))
    assert plain.directory != nested  # text_field is part of the fingerprint
    with pytest.raises(ConfigError, match='no sequence'):  # 'text' is in no record
        prepare.prepare(spec, tokenizer, str(tmp_path / 'out'), workers=1, show_progress=False)
    # Plain-text inputs: the field changes nothing, so the directory keeps its name.
    txt_spec = prepare.PrepareSpec(train=(str(tmp_path / 'c.txt'),), seq_len=32,
                                   unit_bytes=1 << 20)
    names = {prepare.make_plan(dataclass_replace(txt_spec, text_field=f), tokenizer,
                               str(tmp_path / 'txt')).directory for f in ('text', 'body')}
    assert names == {txt}


def dataclass_replace(spec, **kw):
    import dataclasses
    return dataclasses.replace(spec, **kw)


def test_parquet_row_groups_are_units_and_compressed_files_are_one(tmp_path):
    parquet = _write(tmp_path, 'p.parquet', DOCS)  # 4 row groups of 100 rows
    starts, rows = formats.row_group_starts(parquet)
    assert rows == [100] * 4
    units = plan_units([parquet], (), 'line', 1)
    assert [u.start for u in units] == [0, *starts[1:]] and len(units) == 4
    assert units[-1].end == formats.file_size(parquet)
    assert len(plan_units([parquet], (), 'line', 1 << 30)) == 1
    zst = _write(tmp_path, 'c.jsonl.zst', DOCS)
    assert len(plan_units([zst], (), 'line', 16)) == 1
    plain = _write(tmp_path, 'c.jsonl', DOCS)
    assert len(plan_units([plain], (), 'line', 1024)) > 4  # cut at line starts


BAD = [json.dumps({'text': DOCS[0]}), json.dumps({'other': 1}), '{not json',
       json.dumps({'text': 7}), json.dumps({'text': None}), *(json.dumps({'text': d})
                                                             for d in DOCS[1:300])]


def test_bad_records_are_skipped_and_summarised_with_file_line(tmp_path, tokenizer):
    path = tmp_path / 'bad.jsonl.zst'
    path.write_bytes(_zst(('\n'.join(BAD) + '\n').encode()))
    directory = _prepare(tmp_path, tokenizer, [str(path)])
    skipped = records.read_index(directory).info['skipped']
    assert f"2 record(s) with no string field 'text' (data.text_field) (first: {path}:2)" \
        in skipped
    assert f'1 record(s) with not a JSON object (first: {path}:3)' in skipped
    assert f"1 record(s) with field 'text' is not a string (data.text_field) (first: {path}:4)" \
        in skipped
    totals = records.read_index(directory).totals
    assert totals['train']['documents'] + totals['validation']['documents'] == 300


def test_corrupt_compressed_data_is_skipped_or_one_error(tmp_path, tokenizer):
    good = gzip.compress(('\n'.join(DOCS * 50) + '\n').encode())  # 1 MiB of text
    path = tmp_path / 'cut.txt.gz'
    path.write_bytes(good[:len(good) * 2 // 3])  # truncated: the stream ends early
    directory = _prepare(tmp_path, tokenizer, [str(path)])
    skipped = records.read_index(directory).info['skipped']
    assert 'corrupt compressed data' in skipped and f'{path}:' in skipped
    with pytest.raises(ConfigError) as error:
        _prepare(tmp_path, tokenizer, [str(path)], 'strict', bad_input='error')
    assert f'data.train_files: {path}:' in str(error.value) and '\n' not in str(error.value)


@pytest.mark.slow
def test_a_bad_record_under_bad_input_error_is_one_line_exit_2(tmp_path):
    path = tmp_path / 'bad.jsonl'
    path.write_text('\n'.join(BAD) + '\n')
    done = launch(tmp_path / 'run', tiny_args(str(path), 2, '--config.data.bad_input=error'),
                  command='prepare')
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith('error:')]
    assert lines == [f"error: data.train_files: {path}:2: no string field 'text' "
                     "(data.text_field) (data.bad_input=error; set it to 'skip' to drop such "
                     'input)']


@pytest.mark.parametrize(('module', 'name'), [('zstandard', 'c.jsonl.zst'),
                                              ('pyarrow.parquet', 'c.parquet')])
def test_a_missing_library_is_one_line_naming_the_extra(tmp_path, tokenizer, monkeypatch,
                                                        module, name):
    path = _write(tmp_path, name, DOCS[:50])
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError, match=r'needs the optional extra \[formats\]'):
        _prepare(tmp_path, tokenizer, [path])


def test_the_tokenizer_sample_reads_the_formats(tmp_path):
    from text.sample import sample_texts
    files = [_write(tmp_path, 'a.jsonl.zst', DOCS[:100]), _write(tmp_path, 'b.parquet',
                                                                   DOCS[100:200])]
    assert list(sample_texts(files, 'line', 0)) == DOCS[:200]
    # A compressed file's text is several times its size: capped at the budget anyway.
    big = _write(tmp_path, 'big.txt.zst', DOCS * 200)  # ~5 MB of text, far less compressed
    budget = 1 << 20
    assert formats.file_size(big) < budget
    sample = list(sample_texts([big], 'line', budget))
    assert budget <= sum(len(d) for d in sample) < budget + max(len(d) for d in DOCS)
    assert sample == (DOCS * 200)[:len(sample)]  # from its start


@pytest.mark.slow
def test_pretraining_on_a_jsonl_zst_corpus(tmp_path, corpus):
    import glob
    lines = [line for f in sorted(glob.glob(corpus)) for line in open(f).read().splitlines()]
    path = tmp_path / 'corpus.jsonl.zst'
    path.write_bytes(_zst(_jsonl(lines)))
    done = launch(tmp_path / 'run', tiny_args(str(path), 4))
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / 'run')
    assert any('loss' in m and np.isfinite(m['loss']) for m in metrics)


def test_formats_on_gs_prepare_as_the_local_files(tmp_path, tokenizer):
    from etils import epath

    from tests.fake_gcs import fake_gcs
    from text.corpus import resolve_text_files
    local = [_write(tmp_path, 'a.jsonl.zst', DOCS[:200]), _write(tmp_path, 'b.parquet',
                                                                   DOCS[200:])]
    expected = _sequences(_prepare(tmp_path, tokenizer, local, 'local'))
    with fake_gcs() as url:
        for path in local:
            (epath.Path(url) / 'corpus' / pathlib.Path(path).name).write_bytes(
                pathlib.Path(path).read_bytes())
        files = resolve_text_files(f'{url}/corpus/*')
        assert files == [f'{url}/corpus/a.jsonl.zst', f'{url}/corpus/b.parquet']
        assert _sequences(_prepare(tmp_path, tokenizer, files, 'remote')) == expected
