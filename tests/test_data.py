"""Corpus preparation (parallel, sharded, resumable), packing, hold-out, bad input,
the tokenizer sample, mixtures and batches."""

import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from engine.errors import ConfigError
from tests.helpers import make_sentences, small_tokenizer
from text import batches, packing, prepare, records, sample
from text import tokenizer as tk


@pytest.fixture(scope='module')
def tok(tmp_path_factory) -> tk.Tokenizer:
    return small_tokenizer(tmp_path_factory.mktemp('tok'))


def write_lines(path, lines) -> str:
    path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
    return str(path)


def spec(train, evals=(), **kw) -> prepare.PrepareSpec:
    kw.setdefault('seq_len', 16)
    return prepare.PrepareSpec(train=tuple(train), evals=tuple(evals), **kw)


def all_rows(directory, split) -> dict[str, np.ndarray]:
    source = records.open_split(directory, split)
    return source.read(range(len(source)))


def docs_of(rows) -> list[list[int]]:
    """The documents of packed rows (pieces rejoined across rows, [SEP] as terminator)."""
    docs, current = [], []
    for ids in rows['input_ids']:
        for t in ids[1:]:
            if t == tk.PAD_ID:
                continue
            if t == tk.SEP_ID:
                docs.append(current)
                current = []
            else:
                current.append(int(t))
    return docs


def dir_bytes(directory) -> dict[str, bytes]:
    return {f: open(os.path.join(directory, f), 'rb').read() for f in sorted(os.listdir(directory))
            if not f.startswith('.')}


def test_prepare_matches_in_memory_packing(tmp_path, tok):
    lines = make_sentences(300, seed=0)
    train = write_lines(tmp_path / 'a.txt', lines[:200])
    evals = write_lines(tmp_path / 'b.txt', lines[200:])
    directory, index = prepare.prepare(spec([train], [evals]), tok, str(tmp_path / 'd'))
    for split, part in (('train', lines[:200]), ('validation', lines[200:])):
        expected = packing.pack_documents(tok.encode_batch(part), 16)
        got = all_rows(directory, split)
        assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert index.dtype == 'uint16'  # 150 pieces fit: half the bytes of int32
    shard = os.path.join(directory, index.shards['train'][0]['file'])
    assert os.path.getsize(shard) > 0 and index.totals['train']['documents'] == 200
    assert 'tensorflow' not in sys.modules


def test_hold_out_by_hash_is_stable_when_files_are_added(tmp_path, tok):
    lines = make_sentences(400, seed=1)
    a = write_lines(tmp_path / 'a.txt', lines[:300])
    directory, _ = prepare.prepare(spec([a], eval_fraction=0.2), tok, str(tmp_path / 'd'))
    held = docs_of(all_rows(directory, 'validation'))
    kept = docs_of(all_rows(directory, 'train'))
    assert 30 < len(held) < 90 and len(held) + len(kept) == 300
    b = write_lines(tmp_path / 'b.txt', lines[300:])
    grown, _ = prepare.prepare(spec([a, b], eval_fraction=0.2), tok, str(tmp_path / 'd'))
    assert grown != directory
    held_after = docs_of(all_rows(grown, 'validation'))
    assert held_after[:len(held)] == held  # the same documents, still held out
    assert not {tuple(d) for d in held_after} & {tuple(d) for d in docs_of(all_rows(grown,
                                                                                   'train'))}
    # The size cap lowers the fraction: far fewer documents held out.
    capped, _ = prepare.prepare(spec([a], eval_fraction=0.2, eval_max_bytes=500), tok,
                                str(tmp_path / 'd'))
    assert 0 < len(docs_of(all_rows(capped, 'validation'))) < len(held) / 3
    with pytest.raises(ConfigError, match='no document was held out'):
        prepare.prepare(spec([a], eval_fraction=1e-9, eval_max_bytes=0), tok,
                        str(tmp_path / 'd'))


def test_reuse_fingerprint_and_interrupted_resume(tmp_path, tok, monkeypatch):
    train = write_lines(tmp_path / 'a.txt', make_sentences(400, seed=2))
    full_spec = spec([train], unit_bytes=2048, eval_fraction=0.1)
    whole, index = prepare.prepare(full_spec, tok, str(tmp_path / 'whole'))
    units = len(index.shards['train'])
    assert units > 1  # several units, one shard each
    # A crash in the third unit: nothing reads as complete, the done units stay done.
    calls = []
    real = prepare.prepare_unit

    def crash_on_third(unit, *args, **kw):
        calls.append(unit.number)
        if unit.number == 2:
            raise KeyboardInterrupt
        return real(unit, *args, **kw)

    monkeypatch.setattr(prepare, 'prepare_unit', crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(full_spec, tok, str(tmp_path / 'part'))
    plan = prepare.make_plan(full_spec, tok, str(tmp_path / 'part'))
    assert records.read_index(plan.directory) is None
    with pytest.raises(ValueError, match='not prepared'):
        records.open_split(plan.directory, 'train')
    assert not [f for f in os.listdir(plan.directory) if f.startswith('train-00002-')]
    calls.clear()
    monkeypatch.setattr(prepare, 'prepare_unit', lambda u, *a, **k: (calls.append(u.number),
                                                                       real(u, *a, **k))[1])
    resumed, _ = prepare.prepare(full_spec, tok, str(tmp_path / 'part'))
    assert calls == list(range(2, units))  # only the units not done
    assert dir_bytes(resumed) == dir_bytes(whole)
    calls.clear()
    assert prepare.prepare(full_spec, tok, str(tmp_path / 'part'))[0] == resumed
    assert calls == []  # prepared: found, not redone
    other_seed, _ = prepare.prepare(spec([train], unit_bytes=2048, eval_fraction=0.1,
                                         seed=1), tok, str(tmp_path / 'part'))
    assert other_seed != resumed
    os.utime(train, ns=(1, 1))  # a changed input gets a new directory
    assert prepare.prepare(full_spec, tok, str(tmp_path / 'part'))[0] != resumed


def test_worker_processes_write_the_same_bytes(tmp_path, tok):
    train = write_lines(tmp_path / 'a.txt', make_sentences(600, seed=3))
    s = spec([train], unit_bytes=1 << 12, eval_fraction=0.1)
    serial, index = prepare.prepare(s, tok, str(tmp_path / 'serial'), workers=1)
    assert len(index.shards['train']) >= 3
    parallel, _ = prepare.prepare(s, tok, str(tmp_path / 'parallel'), workers=2)
    assert dir_bytes(parallel) == dir_bytes(serial)


def test_bad_input_skipped_with_summary_or_one_line_error(tmp_path, tok):
    good = write_lines(tmp_path / 'good.txt', make_sentences(200, seed=4))
    (tmp_path / 'blob.bin').write_bytes(b'\x00\x01\x02binary' * 100)
    (tmp_path / 'empty.txt').write_bytes(b'')
    mixed = tmp_path / 'mixed.txt'
    mixed.write_bytes(b'the cat sat .\nthe dog \xff\xfe ran .\nthe bird flew .\n')
    inputs = [good, str(tmp_path / 'blob.bin'), str(tmp_path / 'empty.txt'), str(mixed)]
    directory, index = prepare.prepare(spec(inputs, eval_fraction=0.2), tok, str(tmp_path / 'd'))
    skipped = index.info['skipped']
    assert '1 binary file(s) (first: ' in skipped and 'blob.bin' in skipped
    assert '1 empty file(s)' in skipped
    assert f'1 line(s) of invalid UTF-8 (first: {mixed}:2)' in skipped
    total = sum(index.totals[split]['documents'] for split in records.SPLITS)
    assert total == 202  # the good file and the two good lines of mixed.txt
    with pytest.raises(ConfigError, match=r'blob.bin is binary \(data.bad_input=error'):
        prepare.prepare(spec(inputs, bad_input='error'), tok, str(tmp_path / 'e'))
    with pytest.raises(ConfigError, match=rf'{mixed}:2 is not valid UTF-8'):
        prepare.prepare(spec([good, str(mixed)], bad_input='error'), tok, str(tmp_path / 'e'))
    with pytest.raises(ConfigError, match='no readable text'):
        prepare.prepare(spec([str(tmp_path / 'blob.bin')]), tok, str(tmp_path / 'e'))


def test_blank_line_documents_and_unit_cuts(tmp_path, tok):
    paragraphs = [' '.join(make_sentences(3, seed=i)) for i in range(60)]
    text = ''.join(p.replace(' . ', ' .\n') + '\n\n' for p in paragraphs)
    path = tmp_path / 'p.txt'
    path.write_text(text)
    directory, index = prepare.prepare(
        spec([str(path)], [str(path)], doc_separator='blank_line', unit_bytes=1 << 10), tok,
        str(tmp_path / 'd'))
    assert len(index.shards['validation']) > 3  # cut into several units, at blank lines
    assert docs_of(all_rows(directory, 'validation')) == tok.encode_batch(paragraphs)


def test_tokenizer_sample_is_bounded_seeded_and_spread(tmp_path):
    lines = [f'line {i} ' + 'x' * 200 for i in range(40_000)]  # ~8.5 MB
    path = write_lines(tmp_path / 'big.txt', lines)
    small = write_lines(tmp_path / 'small.txt', lines[:10])
    assert list(sample.sample_texts([small], 'line', 1 << 20)) == lines[:10]  # whole, in order
    picked = list(sample.sample_texts([path], 'line', 2 << 20, seed=0))
    size = sum(len(t) + 1 for t in picked)
    assert 2 << 20 <= size <= 3 << 20
    numbers = [int(t.split()[1]) for t in picked]
    assert min(numbers) < 20_000 < max(numbers)  # not just the first lines
    assert picked == list(sample.sample_texts([path], 'line', 2 << 20, seed=0))
    assert picked != list(sample.sample_texts([path], 'line', 2 << 20, seed=1))


def test_mixture_shares_and_determinism():
    a, b = make_chunks(50), make_chunks(7)
    b['input_ids'] += 1000  # source b's rows are 1000+
    mix = batches.PretrainBatches([a, b], 10, seed=0, weights=[0.7, 0.3])
    drawn = sum((rows(mix.batch(s)) for s in range(100)), [])
    share_b = np.mean([r >= 1000 for r in drawn])
    assert share_b == pytest.approx(0.3, abs=0.01)
    again = batches.PretrainBatches([a, b], 10, seed=0, weights=[0.7, 0.3])
    assert rows(again.batch(57)) == rows(mix.batch(57))
    halves = [batches.PretrainBatches([a, b], 10, 0, i, 2, weights=[0.7, 0.3]) for i in (0, 1)]
    assert rows(halves[0].batch(9)) + rows(halves[1].batch(9)) == rows(mix.batch(9))
    with pytest.raises(ValueError, match='one positive weight per source'):
        batches.PretrainBatches([a, b], 10, seed=0, weights=[1.0])


class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A locally prepared text dataset, standing in for e.g. tfds:wikipedia offline."""

    VERSION = tfds.core.Version('1.0.0')
    code_path = None  # tfds would look for checksums beside a builder in a package

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
    monkeypatch.setenv('TFDS_DATA_DIR', str(tfds_dir))  # for worker processes
    directory, _ = prepare.prepare(spec(['tfds:tiny_text:body'], ['tfds:tiny_text:body']), tok,
                                   str(tmp_path / 'd'))
    assert docs_of(all_rows(directory, 'train')) == tok.encode_batch(make_sentences(20, seed=0))
    assert docs_of(all_rows(directory, 'validation')) == tok.encode_batch(
        make_sentences(20, seed=1))
    with pytest.raises(ConfigError, match="no feature 'text'"):
        prepare.prepare(spec(['tfds:tiny_text']), tok, str(tmp_path / 'd'))
    assert 'tensorflow' not in sys.modules


def test_pack_documents():
    docs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10])]
    out = packing.pack_documents(docs, seq_len=5)
    # Stream: 5 6 7 SEP | 8 SEP 9 10 | SEP, cut into windows of 4 after [CLS].
    np.testing.assert_array_equal(out['input_ids'], [[2, 5, 6, 7, 3],
                                                     [2, 8, 3, 9, 10],
                                                     [2, 3, 0, 0, 0]])
    np.testing.assert_array_equal(out['segment_ids'], [[1, 1, 1, 1, 1],
                                                       [1, 1, 1, 2, 2],
                                                       [1, 1, 0, 0, 0]])
    assert out['input_ids'].dtype == np.int32 and out['segment_ids'].dtype == np.int32
    assert packing.padding_fraction(out) == pytest.approx(3 / 15)
    exact = packing.pack_documents([np.array([5, 6]), np.array([], np.int32), np.array([7])], 4)
    np.testing.assert_array_equal(exact['input_ids'], [[2, 5, 6, 3], [2, 3, 7, 3]])
    np.testing.assert_array_equal(exact['segment_ids'], [[1, 1, 1, 1], [1, 1, 2, 2]])
    assert packing.pack_documents([], 8)['input_ids'].shape == (0, 8)
    with pytest.raises(ValueError, match='seq_len'):
        packing.pack_documents(docs, 1)


def make_chunks(n: int, seq_len: int = 3) -> dict[str, np.ndarray]:
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)  # row i holds i
    return {'input_ids': ids, 'segment_ids': np.ones_like(ids)}


def rows(batch) -> list[int]:
    return batch['input_ids'][:, 0].tolist()


def test_batches_pure_and_epochs():
    chunks = make_chunks(10)
    b = batches.PretrainBatches(chunks, global_batch_size=4, seed=7)
    assert b.steps_per_epoch == 3
    assert b.batch(0)['input_ids'].shape == (4, 3)
    stream = sum((rows(b.batch(s)) for s in range(10)), [])  # 4 epochs, batches straddle them
    epochs = [stream[i:i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # each chunk once per epoch
    assert len({tuple(e) for e in epochs}) == 4  # a fresh order every epoch
    fresh = batches.PretrainBatches(chunks, global_batch_size=4, seed=7)
    for step in (9, 3, 1000):
        assert rows(fresh.batch(step)) == rows(b.batch(step)) == rows(b.batch(step))
    other = batches.PretrainBatches(chunks, 4, seed=8)
    assert sum((rows(other.batch(s)) for s in range(3)), []) != stream[:12]
    plain = batches.PretrainBatches(chunks, 4, seed=7, shuffle=False)
    assert rows(plain.batch(2)) == [8, 9, 0, 1]


def test_process_shards():
    chunks = make_chunks(13)
    whole = batches.PretrainBatches(chunks, global_batch_size=6, seed=3)
    parts = [batches.PretrainBatches(chunks, 6, seed=3, process_index=i, process_count=3)
             for i in range(3)]
    for step in range(5):
        shards = [rows(p.batch(step)) for p in parts]
        assert all(len(s) == 2 for s in shards)
        assert sum(shards, []) == rows(whole.batch(step))
    with pytest.raises(ValueError, match='not divisible'):
        batches.PretrainBatches(chunks, 6, seed=3, process_index=0, process_count=4)
    with pytest.raises(ValueError, match='empty'):
        batches.PretrainBatches(make_chunks(0), 2, seed=0)


def test_iterate_matches_batch():
    b = batches.PretrainBatches(make_chunks(11), global_batch_size=4, seed=1)
    it = b.iterate(start_step=5)
    got = [next(it) for _ in range(4)]
    assert [s for s, _ in got] == [5, 6, 7, 8]
    for step, batch in got:
        expected = b.batch(step)
        assert all(np.array_equal(batch[k], expected[k]) for k in expected)


def test_eval_batches():
    chunks = make_chunks(10)
    served = list(batches.eval_batches(chunks, batch_size=4))
    assert [x['input_ids'].shape for x in served] == [(4, 3)] * 3
    assert sum((rows(x) for x in served), [])[:10] == list(range(10))
    last = served[-1]
    assert (last['input_ids'][2:] == tk.PAD_ID).all() and (last['segment_ids'][2:] == 0).all()
    halves = [list(batches.eval_batches(chunks, 4, process_index=i, process_count=2))
              for i in range(2)]
    for whole, a, b in zip(served, *halves, strict=True):
        assert rows(a) + rows(b) == rows(whole)


class RecordingSource:
    """A source that remembers every read: one tuple of row indices per call."""

    def __init__(self, n: int):
        self.inner, self.calls = records.ArraySequences(make_chunks(n)), []

    def __len__(self) -> int:
        return len(self.inner)

    def read(self, indices):
        self.calls.append(tuple(int(i) for i in indices))
        return self.inner.read(indices)


def test_each_process_reads_only_its_rows():
    whole = batches.PretrainBatches(make_chunks(40), 8, seed=5)
    sources = [RecordingSource(40), RecordingSource(40)]
    parts = [batches.PretrainBatches(sources[i], 8, seed=5, process_index=i, process_count=2)
             for i in (0, 1)]
    for p in parts:  # through grain's prefetching threads, as training reads
        for _, _ in zip(range(6), p.iterate(0), strict=False):
            pass
    for i, source in enumerate(sources):
        steps = len(source.calls)  # 6, plus whatever was prefetched
        assert steps >= 6
        own = {tuple(rows(whole.batch(s))[4 * i:4 * i + 4]) for s in range(steps)}
        assert set(source.calls) == own  # one read per step, of this process's rows only
    evals = [RecordingSource(10), RecordingSource(10)]
    for i in (0, 1):
        list(batches.eval_batches(evals[i], 4, process_index=i, process_count=2))
    assert evals[0].calls == [(0, 1), (4, 5), (8, 9)] and evals[1].calls == [(2, 3), (6, 7), ()]


def test_mixture_config_resolves_named_sources(tmp_path):
    from configs.pretrain import get_config
    from engine.config_cli import apply_overrides
    from pretrain import data as run_data

    a = write_lines(tmp_path / 'a.txt', ['one'])
    b = write_lines(tmp_path / 'b.txt', ['two'])
    cfg = get_config('tiny')
    apply_overrides(cfg, [f'data.sources.wiki={a}', f'data.sources.books={b}',
                          'data.mixture=wiki:0.7,books:0.3'])
    sources = run_data.resolve_sources(cfg)
    assert [(s.name, s.train, s.eval, s.weight) for s in sources] == [
        ('wiki', (a,), None, 0.7), ('books', (b,), None, 0.3)]
    for mixture, message in (('wiki', 'is not NAME:WEIGHT'), ('wiki:0', 'positive weight'),
                             ('news:1', "unknown source 'news'"),
                             ('wiki:1,wiki:2', 'listed twice')):
        cfg.data.mixture = mixture
        with pytest.raises(ConfigError, match=message):
            run_data.resolve_sources(cfg)


def test_big_units_are_split_into_files_of_bounded_records(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(records, 'RECORDS_PER_FILE', 7)  # small reads stay cheap
    train = write_lines(tmp_path / 'a.txt', make_sentences(200, seed=6))
    directory, index = prepare.prepare(spec([train], [train]), tok, str(tmp_path / 'd'))
    files = index.shards['train']
    assert len(files) > 3 and all(f['sequences'] <= 7 for f in files)
    assert [f['file'] for f in files[:2]] == ['train-00000-0000.array_record',
                                             'train-00000-0001.array_record']
    assert sum(f['sequences'] for f in files) == index.totals['train']['sequences']
    expected = packing.pack_documents(tok.encode_batch(make_sentences(200, seed=6)), 16)
    got = all_rows(directory, 'train')
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_killed_preparation_resumes_to_the_same_bytes(tmp_path, tok):
    """SIGKILL to `launch.py prepare` and its worker processes mid-way, then the same
    command again: it redoes only the unfinished units and ends byte for byte as a
    preparation that was never interrupted."""
    import signal
    import subprocess
    import time

    from tests.helpers import NO_SMALL_CORPUS, REPO, env, launch_command

    lines = make_sentences(2000, seed=7)
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text(''.join(line + '\n' for line in lines * 60))  # ~5 MB
    args = ['--config', f'{REPO}/configs/pretrain.py:tiny', '--config.seq_len=32',
            f'--config.data.train_files={corpus}', '--config.data.shard_mb=0.25',
            '--config.data.workers=2', f'--config.data.tokenizer_model={tok.path}',
            *NO_SMALL_CORPUS]
    killed, whole = tmp_path / 'killed', tmp_path / 'whole'
    proc = subprocess.Popen(launch_command('prepare', '--workdir', str(killed), *args),
                            cwd=REPO, env=env(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not list(killed.glob('data/*/unit-0000[1-9].json')):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (directory,) = list((killed / 'data').iterdir())
    done = len(list(directory.glob('unit-*.json')))
    assert not (directory / 'index.json').exists()
    assert 0 < done < len(prepare.make_plan(
        prepare.PrepareSpec(train=(str(corpus),), seq_len=32, unit_bytes=1 << 18), tok,
        str(tmp_path)).units)
    for workdir in (killed, whole):
        done_run = subprocess.run(launch_command('prepare', '--workdir', str(workdir), *args),
                                  cwd=REPO, env=env(1), capture_output=True, text=True)
        assert done_run.returncode == 0, done_run.stderr[-2000:]
    (reference,) = list((whole / 'data').iterdir())
    assert dir_bytes(directory) == dir_bytes(reference)


def test_segment_ids_are_recomputed_exactly_from_the_ids():
    rng = np.random.default_rng(0)
    for _ in range(200):
        docs = [rng.integers(5, 50, rng.integers(0, 12)) for _ in range(rng.integers(0, 30))]
        packed = packing.pack_documents(docs, int(rng.integers(2, 20)))
        np.testing.assert_array_equal(records.segments_of(packed['input_ids']),
                                      packed['segment_ids'])
