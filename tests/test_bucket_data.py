"""Prepared data read in place from a bucket (a local GCS server, tests/fake_gcs.py): each
process fetches only the records of its rows, through a bounded cache, and gets exactly
the sequences the same files give on disk; damage is one line; training from a bucket
resumes exactly onto another process count."""

import os
import shutil

import numpy as np
import pytest
from etils import epath

from engine.errors import ConfigError
from pretrain import data
from tests.fake_gcs import fake_gcs
from tests.helpers import (
    make_sentences,
    read_metrics,
    small_tokenizer,
    tiny_args,
)
from tests.test_multiprocess import assert_close, launch_two, params
from text import prepare, records, remote
from text.batches import PretrainBatches

SEQ = 64  # 128-byte records: a 64 KiB block holds ~380, so reads cross block headers


@pytest.fixture(scope='module')
def bucket():
    with fake_gcs() as url:
        yield url


@pytest.fixture(scope='module')
def prepared(bucket, tmp_path_factory):
    """The same corpus prepared on disk and in the bucket: (local dir, bucket dir)."""
    root = tmp_path_factory.mktemp('bucket-data')
    tok = small_tokenizer(root)
    text = root / 'a.txt'
    text.write_text(''.join(s + '\n' for s in make_sentences(6000, seed=1)))
    spec = prepare.PrepareSpec(train=(str(text),), evals=(), seq_len=SEQ, eval_fraction=0.05,
                               unit_bytes=160 << 10)
    local, _ = prepare.prepare(spec, tok, str(root / 'local'), show_progress=False)
    remote_dir, _ = prepare.prepare(spec, tok, f'{bucket}/prepared', show_progress=False)
    PREPARED.update(spec=spec, tokenizer=tok)
    return local, remote_dir


PREPARED = {}  # the fixture's spec and tokenizer, to prepare the same data again


def test_records_read_by_range_are_the_files_records(prepared):
    local, remote_dir = prepared
    index = records.read_index(local)
    assert len(index.shards['train']) > 1  # rows from several shards
    for split in records.SPLITS:
        disk = records.open_split(local, split)
        split_remote = remote.RemoteSplit(remote_dir, records.read_index(remote_dir), split)
        # Each shard's first and last records, those beside block headers, and a sample.
        ends = np.cumsum([s['sequences'] for s in records.read_index(local).shards[split]])
        edges = [i for e in ends for i in (e - 1, e)] + [375, 376, 377, 760, 761]
        rows = np.random.default_rng(0).permutation(len(disk))[:30]
        rows = [int(i) for i in [*rows, *edges] if 0 <= i < len(disk)]
        want, got = disk.read(rows), split_remote.read(rows)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
        assert split_remote.records_read == len(set(rows))
    # A run of consecutive records, across block headers and shard ends: a range per shard.
    split_remote = remote.RemoteSplit(remote_dir, records.read_index(remote_dir), 'train')
    disk = records.open_split(local, 'train')
    got = split_remote.read(range(100, 1400))
    np.testing.assert_array_equal(got['input_ids'], disk.read(range(100, 1400))['input_ids'])
    ends = np.cumsum([s['sequences'] for s in index.shards['train']])
    assert ends[0] < 1400 and split_remote.ranges_read == np.searchsorted(ends, 1400) + 1


def share_bytes(split: remote.RemoteSplit, rows: int) -> int:
    return rows * split.layout.record_bytes


def test_each_process_reads_only_its_share(prepared):
    local, remote_dir = prepared
    index = records.read_index(remote_dir)
    disk = records.open_split(local, 'train')
    steps, batch = 3, 16
    for process in range(2):
        split = remote.RemoteSplit(remote_dir, index, 'train')  # no cache: every read counts
        mine = PretrainBatches(split, batch, seed=3, process_index=process, process_count=2)
        alone = PretrainBatches(disk, batch, seed=3)  # one process: the whole global batch
        for step in range(steps):
            got, whole = mine.batch(step), alone.batch(step)
            part = slice(process * batch // 2, (process + 1) * batch // 2)
            np.testing.assert_array_equal(got['input_ids'], whole['input_ids'][part])
        share = share_bytes(split, steps * batch // 2)
        corpus = sum(s['bytes'] for s in index.shards['train'])
        # The record plus its chunk header and at most one block header per read.
        assert share < split.bytes_read < 1.5 * share + 1024
        assert split.bytes_read < corpus / 5
        assert split.records_read == steps * batch // 2


def disk_usage(directory) -> int:
    return sum(e.stat().st_blocks * 512 for e in os.scandir(directory))


def test_the_cache_stays_under_its_bound_and_serves_repeats(prepared, tmp_path, monkeypatch):
    _, remote_dir = prepared
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path))
    cache_mb = 0.04  # 10 files of 4 KiB
    split = data.open_split(remote_dir, 'train', cache_mb)
    directory = split.cache.directory
    assert directory.startswith(str(tmp_path))
    first = split.read(range(10))
    assert split.records_read == 10
    again = split.read(range(10))  # cached: nothing fetched
    assert split.records_read == 10
    np.testing.assert_array_equal(again['input_ids'], first['input_ids'])
    split.read([0])  # a hit: record 0 is now the most recently used
    split.read(range(10, 15))  # full: 5 out, the least recently used (1-5, not 0)
    assert split.records_read == 15 and len(os.listdir(directory)) == 10
    split.read([0])
    assert split.records_read == 15
    split.read([1])
    assert split.records_read == 16
    for start in range(20, 50, 10):
        split.read(range(start, start + 10))
        assert disk_usage(directory) <= cache_mb * data.MB
    assert len(os.listdir(directory)) == 10
    reopened = remote.RecordCache(directory, int(0.02 * data.MB))  # a smaller bound, restarted
    assert reopened.total <= 0.02 * data.MB and disk_usage(directory) <= 0.02 * data.MB
    assert data.open_split(remote_dir, 'train', 0).cache is None
    shutil.rmtree(directory)
    paged = data.open_split(remote_dir, 'train', 1, read_block=8)  # a page = a run of 8
    want = records.open_split(prepared[0], 'train').read([3, 5, 7, 9])
    got = np.concatenate([paged.read([3])['input_ids'], paged.read([5, 7, 9])['input_ids']])
    np.testing.assert_array_equal(got, want['input_ids'])
    assert (paged.records_read, paged.ranges_read) == (16, 2)  # pages 0 and 1; 5, 7 hits
    assert len(os.listdir(paged.cache.directory)) == 2


def test_a_cached_page_cut_short_is_fetched_again(prepared, tmp_path, monkeypatch):
    """A cache file truncated by a crash (renamed before the disk had its bytes) is never
    served: it is dropped and the records come from the bucket again, the same."""
    local, remote_dir = prepared
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path))
    want = records.open_split(local, 'train').read(range(8))['input_ids']
    split = data.open_split(remote_dir, 'train', 1, read_block=4)
    np.testing.assert_array_equal(split.read(range(8))['input_ids'], want)
    assert split.records_read == 8
    directory = split.cache.directory
    page = sorted(os.listdir(directory))[0]
    with open(os.path.join(directory, page), 'r+b') as f:
        f.truncate(100)
    again = data.open_split(remote_dir, 'train', 1, read_block=4)  # a restarted process
    np.testing.assert_array_equal(again.read(range(8))['input_ids'], want)
    assert again.records_read == 4  # the damaged page only
    assert os.path.getsize(os.path.join(directory, page)) == 4 * SEQ * 2


def test_a_full_disk_turns_the_cache_off_with_one_warning(prepared, tmp_path, monkeypatch,
                                                           capsys):
    """Writing the cache fails (ENOSPC): one warning, no half file, and reading goes on
    from the bucket with the same records."""
    local, remote_dir = prepared
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path))
    split = data.open_split(remote_dir, 'train', 1)
    directory = split.cache.directory

    def full_disk(path, mode='r', *args, **kwargs):
        if 'w' in mode:
            raise OSError(28, 'No space left on device', path)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(remote, 'open', full_disk, raising=False)
    want = records.open_split(local, 'train').read(range(20))['input_ids']
    for start in (0, 10):
        got = split.read(range(start, start + 10))['input_ids']
        np.testing.assert_array_equal(got, want[start:start + 10])
    err = capsys.readouterr().err
    assert err.count('warning: data.cache_mb') == 1 and 'No space left' in err
    assert os.listdir(directory) == [] and split.cache.total == 0
    assert split.records_read == 20


def test_damaged_shards_in_a_bucket_are_one_line(prepared, bucket):
    local, _ = prepared
    damaged = f'{bucket}/damaged'
    for path in epath.Path(local).iterdir():
        (epath.Path(damaged) / path.name).write_bytes(path.read_bytes())
    index = records.read_index(damaged)
    first, second = (s['file'] for s in index.shards['train'][:2])
    raw = (epath.Path(damaged) / first).read_bytes()
    (epath.Path(damaged) / first).write_bytes(raw[:-100])  # truncated: found by size
    with pytest.raises(ConfigError, match=f'{first} is truncated'):
        data.open_split(damaged, 'train', 0)
    assert [n for n, _ in remote.damaged_shards(damaged, index)] == [first]
    (epath.Path(damaged) / first).write_bytes(raw)
    other = bytearray((epath.Path(damaged) / second).read_bytes())
    other[64 + 30] ^= 0xFF  # record 0's chunk header (its size field): the same file size
    (epath.Path(damaged) / second).write_bytes(bytes(other))
    split = data.open_split(damaged, 'train', 0)
    with pytest.raises(ConfigError, match=f'{second} is not in the expected layout'):
        split.read([index.shards['train'][0]['sequences']])  # record 0 of the second shard
    (epath.Path(damaged) / first).unlink()  # gone after the split was opened
    with pytest.raises(ConfigError, match=f'{first}: a range read failed after retries'):
        split.read([0])


def test_preparing_again_repairs_a_damaged_shard_in_a_bucket(prepared, bucket):
    local, _ = prepared
    spec, tok = PREPARED['spec'], PREPARED['tokenizer']
    directory, index = prepare.prepare(spec, tok, f'{bucket}/repair', show_progress=False)
    name = index.shards['train'][1]['file']
    shard = epath.Path(directory) / name
    shard.write_bytes(shard.read_bytes()[:1000])
    assert prepare.prepare(spec, tok, f'{bucket}/repair', show_progress=False)[1] == index
    assert shard.read_bytes() == (epath.Path(local) / name).read_bytes()


@pytest.mark.slow
def test_training_from_a_bucket_resumes_exactly_onto_another_process_count(
        bucket, corpus, tmp_path, monkeypatch):
    """Two processes train from prepared data in the bucket, as one process does from
    disk; the run killed after its step-3 checkpoint continues in one process, still
    from the bucket, to the same weights."""
    import launch
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path / 'cache'))
    args = tiny_args(corpus, 6, '--config.checkpoint_every_steps=3',
                     '--config.log_every_steps=1', '--config.mesh.shape=(4,2)')
    in_bucket = [*args, f'--config.data.data_dir={bucket}/run-data']
    single = tmp_path / 'single'
    assert launch.main(['pretrain', '--workdir', str(single), *args]) == 0
    two = tmp_path / 'two'
    results = launch_two(two, in_bucket)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr + results[1].stderr
    np.testing.assert_allclose(losses(two), losses(single), rtol=1e-5)  # 2 vs 1 process
    assert_close(params(two), params(single))
    assert not any(p.name.endswith('.array_record')
                   for p in (tmp_path / 'cache').rglob('*'))  # no shard copied whole

    # Killed after the step-3 checkpoint, continued by one process: from the bucket (a
    # small cache) exactly as from the same data on disk.
    resumed = {}
    for name, extra in (('bucket', [*in_bucket, '--config.data.cache_mb=0.2']),
                        ('disk', args)):
        workdir = resumed[name] = tmp_path / name
        shutil.copytree(two, workdir)
        for path in (workdir / 'checkpoints').iterdir():
            if path.name.isdigit() and int(path.name) > 3:
                shutil.rmtree(path)
        assert launch.main(['pretrain', '--workdir', str(workdir), *extra]) == 0
    assert losses(resumed['bucket']) == losses(resumed['disk'])  # bit for bit
    bucket_params, disk_params = params(resumed['bucket']), params(resumed['disk'])
    for key, value in disk_params.items():
        np.testing.assert_array_equal(bucket_params[key], value, err_msg=key)
    assert_close(bucket_params, params(single))
    cache = tmp_path / 'cache' / 'records' / 'process-0'
    assert 0 < disk_usage(cache) <= 0.2 * data.MB


def losses(workdir) -> list[float]:
    return [r['loss'] for r in read_metrics(workdir) if 'loss' in r]


def test_runs_of_consecutive_rows_are_one_range_read_each(prepared):
    local, remote_dir = prepared
    index = records.read_index(remote_dir)
    disk = records.open_split(local, 'train')
    block, batch, steps = 8, 32, 4
    whole = PretrainBatches(disk, batch, seed=3, read_block=block)
    for process in range(2):
        split = remote.RemoteSplit(remote_dir, index, 'train', page_rows=block)
        mine = PretrainBatches(split, batch, seed=3, process_index=process, process_count=2,
                               read_block=block)
        for step in range(steps):
            part = slice(process * batch // 2, (process + 1) * batch // 2)
            np.testing.assert_array_equal(mine.batch(step)['input_ids'],
                                          whole.batch(step)['input_ids'][part])
        runs = steps * batch // 2 // block
        assert split.ranges_read <= runs + 1  # a run may end one shard and open the next
        assert split.bytes_read < 1.5 * share_bytes(split, steps * batch // 2) + 1024
    # An epoch serves every whole run once, each in order.
    n = len(disk)
    rows = np.concatenate([whole.indices(s) for s in range(n // block * block // batch)])
    starts = rows[::block]
    assert (starts % block == 0).all() and len(set(starts)) == len(starts)
    assert (rows.reshape(-1, block) - starts[:, None] == np.arange(block)).all()


@pytest.mark.parametrize('value, message', [
    ('0', 'must be a whole number >= 1, got 0'),
    ('2', 'not supported with seq_len_phases or batch_size_ramp'),
])
def test_a_bad_read_block_is_one_line(value, message, corpus, tmp_path, capsys):
    import launch
    args = tiny_args(corpus, 8, f'--config.data.read_block={value}',
                     '--config.batch_size_ramp=8:0.5')
    assert launch.main(['pretrain', '--workdir', str(tmp_path / 'run'), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: data.read_block: ') and message in err
    assert err.count('\n') == 1 and not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_read_blocks_train_the_same_from_a_bucket_as_from_disk(bucket, corpus, tmp_path,
                                                               monkeypatch):
    import launch
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path / 'cache'))
    args = tiny_args(corpus, 4, '--config.data.read_block=4', '--config.log_every_steps=1')
    runs = {}
    for name, extra in (('disk', []), ('bucket', [f'--config.data.data_dir={bucket}/blocks'])):
        runs[name] = tmp_path / name
        assert launch.main(['pretrain', '--workdir', str(runs[name]), *args, *extra]) == 0
    assert losses(runs['bucket']) == losses(runs['disk'])
    pages = os.listdir(tmp_path / 'cache' / 'records' / 'process-0')
    assert pages and all('-train-4-' in p or '-validation-4-' in p for p in pages)
