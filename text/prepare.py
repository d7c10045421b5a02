"""Preparation: text -> tokenized, packed sequences in sharded array_record files.

    plan = make_plan(spec, tokenizer, root)     # inputs checked, units cut, fingerprint
    run_units(plan, plan.units)                  # worker processes, one unit at a time
    finalize(plan)                               # unit summaries merged into index.json

(`prepare` does all three.) The output directory is ROOT/FINGERPRINT, where the
fingerprint covers the inputs (path, size, mtime), the tokenizer and every setting that
changes the bytes; a second run finds index.json and does nothing. Each unit writes its
shards under temporary names, renames them, then writes `unit-NNNNN.json`: an
interrupted preparation redoes only the units without one, and a directory without
index.json is never read. A finished directory whose shards are missing or of another
size than index.json records is repaired the same way: the damaged units are prepared
again (same bytes), the rest is kept. Memory per worker is bounded by one read block and one
batch of documents, whatever the corpus size.

Held-out split (when no eval files are given): a document is validation when a seeded
hash (crc32) of its text falls under eval_fraction, capped at eval_max_bytes of text (the cap
lowers the fraction for big corpora). Membership depends only on the document and the
seed, so adding files never moves a document into validation while the cap is not
binding; duplicates always land together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Sequence
from concurrent import futures

from etils import epath

from engine.errors import ConfigError
from engine.paths import absolute_path, is_remote, write_bytes_atomic
from engine.progress import Progress
from text import formats, records, remote
from text.corpus import TFDS_PREFIX, is_indexed, open_indexed_split
from text.packing import Packer
from text.tokenizer import load_tokenizer
from text.units import (
    ENCODING_HINT,
    BadInput,
    Unit,
    check_files,
    plan_units,
    unit_document_batches,
)

ENCODE_BATCH_BYTES = 1 << 20  # documents are encoded ~1 MiB of text at a time
IN_PROCESS_BYTES = 16 << 20  # less text than this is prepared without worker processes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PrepareSpec:
    """What to prepare; everything here except `bad_input` is part of the fingerprint."""

    train: tuple[str, ...]  # text files, 'tfds:NAME[:feature]' or 'hf:PATH[:split][:column]'
    evals: tuple[str, ...] = ()  # validation inputs; () = hold out by hash
    seq_len: int = 128
    doc_separator: str = 'line'
    eval_fraction: float = 0.05
    eval_max_bytes: int = 50_000_000
    seed: int = 0
    unit_bytes: int = 32 << 20
    bad_input: str = 'skip'
    text_field: str = 'text'  # JSONL/Parquet inputs' text (fingerprinted only with such inputs)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a worker needs for any unit (picklable)."""

    seq_len: int
    dtype: str
    doc_separator: str
    holdout_threshold: int  # documents whose seeded crc32 is below this are validation
    seed: int
    bad_input: str
    tokenizer_path: str
    text_field: str = 'text'


@dataclasses.dataclass(frozen=True)
class Plan:
    directory: str
    units: tuple[Unit, ...]
    settings: Settings
    fingerprint: str
    total_bytes: int
    bad: BadInput
    info: dict


def _describe(source: str, role: str) -> dict:
    if is_indexed(source):
        split = 'train' if role == 'train' else 'validation'
        ds = open_indexed_split(source, split, f'data.{role}_files')
        kind = 'tfds' if source.startswith(TFDS_PREFIX) else 'hf'
        return {kind: source, 'split': split, 'version': str(ds.dataset_info.version),
                'num_examples': len(ds)}
    if '://' in source:
        st = epath.Path(source).stat()
        return {'path': source, 'size': st.length, 'mtime_ns': int(st.mtime * 1e9)}
    st = os.stat(source)
    return {'path': os.path.abspath(source), 'size': st.st_size, 'mtime_ns': st.st_mtime_ns}


def make_plan(spec: PrepareSpec, tokenizer, root: str) -> Plan:
    """Checks the inputs, cuts units and names the output directory (writes nothing)."""
    if spec.seq_len < 2:
        raise ConfigError(f'seq_len: must be at least 2, got {spec.seq_len}')
    if not spec.evals and not 0.0 < spec.eval_fraction < 1.0:
        raise ConfigError(f'data.eval_fraction: must be in (0, 1), got {spec.eval_fraction}')
    bad = BadInput()
    train = check_files(spec.train, 'data.train_files', spec.bad_input, bad)
    evals = check_files(spec.evals, 'data.eval_files', spec.bad_input, bad) if spec.evals else []
    described = {'train': [_describe(s, 'train') for s in train],
                 'eval': [_describe(s, 'eval') for s in evals]}
    total = sum(d.get('size', 0) for d in described['train'] + described['eval'])
    fraction = 0.0
    if not evals:
        fraction = spec.eval_fraction
        if spec.eval_max_bytes and total:
            fraction = min(fraction, spec.eval_max_bytes / total)
    settings_json = {k: v for k, v in dataclasses.asdict(spec).items()
                     if k not in ('train', 'evals', 'bad_input', 'text_field')}
    info = {'inputs': described, 'tokenizer': tokenizer.fingerprint, 'settings': settings_json,
            'eval_fraction_used': fraction, 'format_version': records.FORMAT_VERSION}
    if any(formats.file_format(s).records for s in train + evals if not is_indexed(s)):
        info['text_field'] = spec.text_field  # absent otherwise: plain-text names unchanged
    units = plan_units(train, evals, spec.doc_separator, spec.unit_bytes)
    if any(u.parts for u in units):
        # Small files packed together: not the layout older versions made of the same
        # inputs, so never resumed from their unit summaries. (Absent otherwise, so a
        # directory of ungrouped inputs keeps its name.)
        info['grouped_small_files'] = True
    fingerprint = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    settings = Settings(
        seq_len=spec.seq_len, dtype=records.token_dtype(tokenizer.vocab_size),
        doc_separator=spec.doc_separator, holdout_threshold=int(fraction * 2**32),
        seed=spec.seed, bad_input=spec.bad_input, tokenizer_path=str(tokenizer.path),
        text_field=spec.text_field)
    directory = str(absolute_path(root) / fingerprint)
    return Plan(directory, tuple(units), settings, fingerprint, total, bad, info)


# ---------------------------------------------------------------- one unit (a worker's job)

_TOKENIZERS: dict[str, object] = {}
_COUNTERS: tuple | None = None  # shared (bytes, documents) counters in worker processes


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


class _SplitOutput:
    """One split of one unit: a packer feeding a shard writer, and counts."""

    def __init__(self, directory: str, split: str, unit: int, settings: Settings):
        self.packer = Packer(settings.seq_len)
        self.writer = records.ShardWriter(directory, split, unit)
        self.dtype = settings.dtype
        self.documents = 0

    def add(self, docs: list) -> None:
        self.documents += len(docs)
        self.writer.write_rows(self.packer.add(docs)[0], self.dtype)

    def close(self) -> dict:
        self.writer.write_rows(self.packer.finish()[0], self.dtype)
        files = self.writer.close()
        return {'files': files, 'sequences': self.writer.records, 'tokens': self.packer.tokens,
                'documents': self.documents}


def prepare_unit(unit: Unit, settings: Settings, directory: str, num_threads: int = 1,
                 process_index: int = 0) -> dict:
    """Tokenizes and packs one unit into its shards in `directory` (local or gs://) and
    writes its summary `unit-NNNNN.json` last (with the process that made it). Returns
    the summary."""
    staging = tempfile.mkdtemp(prefix='prepare-') if is_remote(directory) else directory
    _remove_leftovers(staging, unit.number)
    try:
        summary = {**_write_unit(unit, settings, staging, num_threads),
                   'process': process_index}
        if staging != directory:
            for split in records.SPLITS:
                for entry in summary[split]['files']:
                    name = entry['file']
                    epath.Path(os.path.join(staging, name)).copy(
                        epath.Path(directory) / name, overwrite=True)
    finally:
        if staging != directory:
            shutil.rmtree(staging, ignore_errors=True)
    write_bytes_atomic(epath.Path(directory) / unit_summary_name(unit.number),
                       json.dumps(summary, sort_keys=True).encode())
    return summary


def _remove_leftovers(directory: str, unit: int) -> None:
    """Temporary files of an earlier, killed attempt at this unit."""
    for split in records.SPLITS:
        for path in glob.glob(os.path.join(glob.escape(directory), f'{split}-{unit:05d}-*.tmp-*')):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def unit_summary_name(number: int) -> str:
    return f'unit-{number:05d}.json'


def _write_unit(unit: Unit, settings: Settings, directory: str, num_threads: int) -> dict:
    tokenizer = _tokenizer(settings.tokenizer_path)
    bad = BadInput()
    outputs = {s: _SplitOutput(directory, s, unit.number, settings) for s in records.SPLITS}
    try:
        texts: list[str] = []
        pending = 0
        for docs, size in unit_document_batches(unit, settings.doc_separator, bad,
                                                settings.bad_input, settings.text_field):
            texts.extend(docs)
            pending += size
            if pending >= ENCODE_BATCH_BYTES:
                _encode_into(texts, unit, settings, tokenizer, outputs, num_threads)
                _report(pending, len(texts))
                texts, pending = [], 0
        _encode_into(texts, unit, settings, tokenizer, outputs, num_threads)
        _report(pending, len(texts))
        closed = {s: out.close() for s, out in outputs.items()}
    except BaseException:
        for out in outputs.values():
            out.writer.abort()
        raise
    return {'unit': dataclasses.asdict(unit), **closed,
            'bad_lines': bad.lines, 'first_bad_line': bad.first_line,
            'bad_records': bad.records}


def _encode_into(texts, unit, settings, tokenizer, outputs, num_threads) -> None:
    if not texts:
        return
    ids = tokenizer.encode_batch(texts, num_threads=num_threads)
    threshold = settings.holdout_threshold
    if unit.role == 'eval' or not threshold:
        outputs['validation' if unit.role == 'eval' else 'train'].add([d for d in ids if d])
        return
    train, held = [], []
    start = zlib.crc32(settings.seed.to_bytes(8, 'little', signed=True))
    for text, doc in zip(texts, ids, strict=True):
        if doc:
            (held if zlib.crc32(text.encode(), start) < threshold else train).append(doc)
    outputs['train'].add(train)
    outputs['validation'].add(held)


def _report(num_bytes: int, docs: int) -> None:
    if _COUNTERS is not None:
        with _COUNTERS[0].get_lock():
            _COUNTERS[0].value += num_bytes
            _COUNTERS[1].value += docs


def _init_worker(counters) -> None:
    global _COUNTERS
    _COUNTERS = counters


# ---------------------------------------------------------------- many units


def pending_units(plan: Plan, units: Sequence[Unit]) -> list[Unit]:
    """The units whose summary is not written yet."""
    done = epath.Path(plan.directory)
    return [u for u in units if not (done / unit_summary_name(u.number)).exists()]


def run_units(plan: Plan, units: Sequence[Unit], workers: int = 0,
              show_progress: bool = True, process_index: int = 0) -> None:
    """Prepares `units` (those not done yet) with `workers` processes (0 = one per core,
    or none for less than IN_PROCESS_BYTES of text); `process_index` is this host's,
    recorded in the unit summaries."""
    global _COUNTERS
    epath.Path(plan.directory).mkdir(parents=True, exist_ok=True)
    todo = pending_units(plan, units)
    if not todo:
        return
    total = sum(u.size for u in todo)
    if not workers and total < IN_PROCESS_BYTES:
        workers = 1  # starting worker processes would cost more than it saves
    workers = min(workers or os.cpu_count() or 1, len(todo))
    ctx = multiprocessing.get_context('spawn')  # never fork a process that runs JAX
    counters = (ctx.Value('q', 0), ctx.Value('q', 0))
    progress = Progress('prepare', total, lambda: (counters[0].value, counters[1].value),
                        extra_name='docs', enabled=show_progress)
    try:
        with progress:
            if workers == 1:  # in this process; the tokenizer threads over each batch
                _COUNTERS = counters
                for unit in todo:
                    prepare_unit(unit, plan.settings, plan.directory, os.cpu_count() or 1,
                                 process_index)
            else:
                with futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                                 initializer=_init_worker,
                                                 initargs=(counters,)) as pool:
                    jobs = [pool.submit(prepare_unit, u, plan.settings, plan.directory, 1,
                                        process_index) for u in todo]
                    try:
                        for job in futures.as_completed(jobs):
                            job.result()  # a worker's error is raised here
                    except BaseException:
                        for job in jobs:
                            job.cancel()
                        raise
    except formats.BadRecord as e:  # BadLine too
        raise ConfigError(e.message('data.train_files')) from None
    finally:
        _COUNTERS = None


def reusable_index(plan: Plan, repair: bool = True) -> records.Index | None:
    """The finished index of the plan's directory, or None when (some of) it must be
    prepared: with `repair`, the units of missing or resized shards lose their summaries
    (and index.json goes), so run_units redoes just those; else a one-line error. A
    bucket directory is checked from one listing (sizes; nothing is downloaded)."""
    index = records.read_index(plan.directory)
    if index is None:
        return index
    remote_dir = is_remote(plan.directory)
    damaged = (remote.damaged_shards if remote_dir else records.damaged_shards)(
        plan.directory, index)
    if not damaged:
        return index
    name, problem = damaged[0]
    directory = epath.Path(plan.directory)
    if not repair:
        raise records.damage_error(str(directory / name), problem)
    numbers = sorted({records.shard_unit(n) for n, _ in damaged})
    log.warning('prepared data: %s is %s; preparing %d unit(s) of %s again', name, problem,
                len(numbers), plan.directory)
    (directory / records.INDEX_FILENAME).unlink()  # first: now incomplete
    for number in numbers:
        with contextlib.suppress(FileNotFoundError):
            (directory / unit_summary_name(number)).unlink()
        for split in records.SPLITS:
            pattern = f'{split}-{number:05d}-*.array_record'
            if remote_dir:
                paths = list(directory.glob(pattern))
            else:
                paths = glob.glob(os.path.join(glob.escape(plan.directory), pattern))
            for path in paths:
                epath.Path(path).unlink()
    return None


def finalize(plan: Plan) -> records.Index:
    """Merges the unit summaries into index.json (every unit must be done)."""
    directory = epath.Path(plan.directory)
    missing = pending_units(plan, plan.units)
    if missing:
        raise RuntimeError(f'{plan.directory}: {len(missing)} unit(s) not prepared '
                           f'(first: {missing[0].number})')
    shards = {split: [] for split in records.SPLITS}
    totals = {split: dict.fromkeys(('sequences', 'documents', 'tokens'), 0)
              for split in records.SPLITS}
    bad = dataclasses.replace(plan.bad, files=dict(plan.bad.files), records={})
    for unit in plan.units:
        summary = json.loads((directory / unit_summary_name(unit.number)).read_text())
        for split in records.SPLITS:
            shards[split].extend(summary[split]['files'])
            for key, total in totals[split].items():
                totals[split][key] = total + summary[split][key]
        if summary['bad_lines']:
            bad.lines += summary['bad_lines']
            bad.first_line = bad.first_line or tuple(summary['first_bad_line'])
        bad.merge_records(summary.get('bad_records', {}))
    index = records.Index(seq_len=plan.settings.seq_len, dtype=plan.settings.dtype,
                          shards=shards, totals=totals, fingerprint=plan.fingerprint,
                          info={**plan.info, 'skipped': bad.summary()})
    if not index.sequences('train'):
        skipped = bad.summary()
        raise ConfigError('data.train_files: the training text produced no sequence' + (
            f' ({skipped}; {ENCODING_HINT})' if bad.lines else f' ({skipped})' if skipped
            else ''))
    if not index.sequences('validation'):
        raise ConfigError('data.eval_fraction: no document was held out for validation; '
                          'raise it or set data.eval_files')
    records.write_index(directory, index)
    return index


def prepare(spec: PrepareSpec, tokenizer, root: str, workers: int = 0,
            show_progress: bool = True) -> tuple[str, records.Index]:
    """Prepares everything on this host (or finds it done); (directory, index)."""
    plan = make_plan(spec, tokenizer, root)
    index = reusable_index(plan)
    if index is None:
        started = time.time()
        run_units(plan, plan.units, workers, show_progress)
        index = finalize(plan)
        log.info('prepared %s in %.1fs', plan.directory, time.time() - started)
    return plan.directory, index
