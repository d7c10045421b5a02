"""The pretraining corpus of a run: config -> prepared data (text/) on every host -> batches.

`prepare_all(cfg, files, tokenizer, root)` prepares each source of the run once (a
second call finds index.json and returns at once), sharing the work between the
processes of a multi-host run when they all see the data directory (gs://, or a shared
file system): process i prepares units i, i+P, ... and process 0 merges the index.
With host-local data directories every host prepares everything. A gs:// directory is
read in place (text/remote.py): each host fetches only the records of its rows, through a
bounded cache on its disk (data.cache_mb); a gcsfuse mount is a local path.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Iterator

import ml_collections
from etils import epath

from engine import distributed
from engine.errors import ConfigError
from engine.paths import default_cache_dir, is_remote
from text import corpus, prepare, records, remote, tasks
from text.batches import Mixed
from text.sample import sample_texts

MB = 1 << 20
# data.cache_mb's default (configs/pretrain.py says why).
DEFAULT_CACHE_MB = 1024.0
# Named corpora a run can train on: text.corpus's, and the benchmark tasks' unlabelled
# train text ('tasks'; held out by hash like a file, as it has no split of its own here).
PRETRAIN_CORPORA = corpus.NAMED_CORPORA + (tasks.TEXT_CORPUS,)


@dataclasses.dataclass(frozen=True)
class Source:
    """One corpus of the run: its training inputs, validation inputs (None = held out
    by hash) and mixture weight."""

    name: str
    train: tuple[str, ...]
    eval: tuple[str, ...] | None
    weight: float = 1.0


def _resolve(name: str, spec: str, eval_spec: str, key: str) -> Source:
    try:
        if corpus.is_indexed(spec):
            return Source(name, (spec,), (eval_spec,) if eval_spec else None)
        if spec.strip() == tasks.TEXT_CORPUS:
            train = (str(tasks.train_text()),)
        else:
            train = tuple(corpus.resolve_text_files(spec, 'train', key))
        if eval_spec:
            evals = tuple(corpus.resolve_text_files(eval_spec, 'validation', 'data.eval_files'))
        elif spec in corpus.NAMED_CORPORA:  # the named corpus's validation split
            evals = tuple(corpus.resolve_text_files(spec, 'validation', key))
        else:
            evals = None
    except ValueError as e:
        message = str(e)
        raise ConfigError(message if message.startswith('data.') else f'{key}: {message}'
                          ) from None
    return Source(name, train, evals)


def resolve_sources(cfg: ml_collections.ConfigDict) -> list[Source]:
    """The run's sources: data.train_files (+ eval_files), or each entry of data.mixture."""
    d = cfg.data
    mixture = d.get('mixture', '')
    if not mixture:
        return [_resolve('train', d.train_files, d.eval_files, 'data.train_files')]
    if d.eval_files:
        raise ConfigError('data.eval_files: not used with data.mixture (each source holds out '
                          'its own validation text); leave it empty')
    named = dict(d.get('sources', {}))
    sources = []
    for item in mixture.split(','):
        name, sep, weight = item.strip().rpartition(':')
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0:
            raise ConfigError(f'data.mixture: {item.strip()!r} is not NAME:WEIGHT with a '
                              'positive weight')
        if name not in named and name not in PRETRAIN_CORPORA:
            raise ConfigError(f'data.mixture: unknown source {name!r}; use a named corpus '
                              f'{PRETRAIN_CORPORA} or set --config.data.sources.{name}=FILES')
        if any(s.name == name for s in sources):
            raise ConfigError(f'data.mixture: source {name!r} is listed twice')
        source = _resolve(name, named.get(name, name), '', f'data.sources.{name}')
        sources.append(dataclasses.replace(source, weight=value))
    return sources


def tokenizer_sample(cfg: ml_collections.ConfigDict, sources: list[Source]) -> Iterator[str]:
    """The tokenizer's training text: a seeded sample of every source's training text."""
    inputs = [f for s in sources for f in s.train]
    return sample_texts(inputs, cfg.data.doc_separator,
                        int(cfg.data.tokenizer_sample_mb * MB), cfg.seed,
                        cfg.data.get('text_field', 'text'))


def prepare_spec(cfg: ml_collections.ConfigDict, train, evals) -> prepare.PrepareSpec:
    """The run's preparation settings for one source (train inputs, eval inputs or None)."""
    d = cfg.data
    train = (train,) if isinstance(train, str) else tuple(train)
    evals = () if not evals else (evals,) if isinstance(evals, str) else tuple(evals)
    for key in ('shard_mb', 'eval_max_mb', 'tokenizer_sample_mb'):
        if d[key] < 0:
            raise ConfigError(f'data.{key}: must be >= 0, got {d[key]}')
    if d.get('cache_mb', 0) < 0:  # before any work, not when the data is opened
        raise ConfigError(f'data.cache_mb: must be >= 0, got {d.cache_mb}')
    return prepare.PrepareSpec(
        train=train, evals=evals, seq_len=cfg.seq_len, doc_separator=d.doc_separator,
        eval_fraction=float(d.eval_fraction), eval_max_bytes=int(d.eval_max_mb * MB),
        seed=cfg.seed, unit_bytes=max(int(d.shard_mb * MB), 1 << 16), bad_input=d.bad_input,
        text_field=d.get('text_field', 'text'))


def _shared(directory: str) -> bool:
    """Whether every process sees `directory` (a collective): gs:// always; a local path
    when all processes read back the token process 0 wrote there."""
    if is_remote(directory):
        return True
    token = distributed.broadcast_int(secrets.randbits(62))
    probe = epath.Path(directory) / '.shared-probe'
    if distributed.is_main():
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(token))
    distributed.barrier('data-probe')
    seen = probe.exists() and probe.read_text() == str(token)
    (unshared,) = distributed.agree(not seen)
    return not unshared


def _collectively(fn) -> None:
    """Runs fn on this process; every process stops if any failed (a collective)."""
    error = None
    try:
        fn()
    except Exception as e:  # re-raised below, after the peers have heard of it
        error = e
    (failed,) = distributed.agree(error is not None)
    if error is not None:
        raise error
    if failed:
        raise distributed.PeerFailed('another process failed preparing the corpus; its log '
                                     'has the error')


def prepare_source(spec: prepare.PrepareSpec, tokenizer, root: str, workers: int = 0,
                   show_progress: bool = True) -> str:
    """Prepares one source across the run's processes; its (readable, local) directory."""
    plan = prepare.make_plan(spec, tokenizer, root)
    # Several processes would repair a shared directory at once: they say what is damaged.
    if prepare.reusable_index(plan, repair=distributed.process_count() == 1) is None:
        if distributed.process_count() > 1 and _shared(plan.directory):
            p, n = distributed.process_index(), distributed.process_count()
            _collectively(lambda: prepare.run_units(plan, plan.units[p::n], workers,
                                                    show_progress and p == 0, p))
            _collectively(lambda: distributed.is_main() and prepare.finalize(plan))
        else:  # one process, or hosts that do not see each other's files: all of it here
            prepare.run_units(plan, plan.units, workers, show_progress)
            prepare.finalize(plan)
    return plan.directory


def cache_for(cache_mb: float) -> remote.RecordCache | None:
    """This process's cache of records read from buckets (None for cache_mb 0)."""
    if cache_mb < 0:
        raise ConfigError(f'data.cache_mb: must be >= 0, got {cache_mb}')
    if not cache_mb:
        return None
    directory = os.path.join(default_cache_dir(), 'records',
                             f'process-{distributed.process_index()}')
    return remote.shared_cache(directory, int(cache_mb * MB))


def open_split(directory: str, split: str, cache_mb: float = DEFAULT_CACHE_MB,
               read_block: int = 1):
    """One split of a prepared directory: local files (a gcsfuse mount is one), or a
    bucket's, read in pages of read_block records through this host's bounded cache."""
    index = records.read_index(directory)
    if index is None:
        raise ValueError(f'{directory}: not prepared (no {records.INDEX_FILENAME})')
    if is_remote(directory):
        return remote.RemoteSplit(directory, index, split, cache_for(cache_mb), read_block)
    return records.PreparedSplit(directory, index, split)


def open_splits(directories: list[str], weights: list[float] | None,
                cache_mb: float = DEFAULT_CACHE_MB, read_block: int = 1
                ) -> tuple[list, object]:
    """The train splits of each source (for PretrainBatches) and one eval source: the
    sources' validation splits interleaved by weight."""
    train = [open_split(d, 'train', cache_mb, read_block) for d in directories]
    evals = [open_split(d, 'validation', cache_mb, read_block) for d in directories]
    return train, (evals[0] if len(evals) == 1 else Mixed(evals, weights))


def describe(directory: str) -> str:
    """One line about a prepared directory: sizes per split and skipped input."""
    index = records.read_index(directory)
    parts = []
    for split in records.SPLITS:
        t = index.totals[split]
        parts.append(f'{split} {t["sequences"]:,} sequences ({t["documents"]:,} documents, '
                     f'{t["tokens"]:,} tokens)')
    skipped = index.info.get('skipped')
    return '; '.join(parts) + f' in {directory}' + (f'; {skipped}' if skipped else '')
