"""A small corpus of your own continues the `general` English encoder instead of training
from scratch (`data.small_corpus_mb`, docs/pretraining.md "Your own small corpus").

    python launch.py pretrain --config configs/pretrain.py:tiny --workdir runs/mine \\
        --config.data.train_files='corpus/*.txt'

Pretraining from scratch on a few MB of text buys nothing over fine-tuning from scratch at
the tiny budget (docs/benchmark.md); continuing an encoder pretrained on general English for
300 steps on that text (lr 1e-3, warm-up 30) beat from-scratch fine-tuning on every task
measured. So when `data.train_files` names text files (no mixture, no named corpus, no
TFDS/HF dataset) under `data.small_corpus_mb` MB on disk and `init_from` is empty, the run
becomes that continued run: `init_from` = `data.small_corpus_encoder` (a pretraining workdir),
or when that is empty the cache's `general` encoder, built once by the docs' command
(GENERAL_ENCODER, about 25 minutes on 2 CPU cores); the steps, learning rate and warm-up of
CONTINUE; the encoder's own masking rate and schedule; its architecture and tokenizer (as any
`init_from` run). One line says so and names the key that turns it off. config.json records
`data.small_corpus_choice` = CHOICE and the resolved keys, so a resume compares them. A
resumed run keeps the choice it was started with (the corpus size is not re-read): a workdir
started without the rule (off, a large corpus, before the key existed, an import) resumes
without it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import ml_collections
from etils import epath

from configs.pretrain import get_config
from engine import resume_check
from engine.errors import ConfigError
from engine.paths import absolute_path, default_cache_dir
from engine.rundir import RunDir
from pretrain import data
from text import corpus

MB = 1 << 20
# The docs' `general` encoder (docs/benchmark.md): tiny, the modern recipe, 5,000 steps.
GENERAL_ENCODER = 'tiny,recipe=modern,data=general,steps=5000'
CACHE_NAME = 'general-tiny-modern-5000'
CHOICE = 'general_encoder'
# The continued-pretraining settings measured in docs/benchmark.md ("Your own CSV ...").
CONTINUE = {'num_train_steps': 300, 'optimizer.learning_rate': 1e-3,
            'optimizer.warmup_steps': 30}
FROM_ENCODER = ('masking.mask_rate', 'optimizer.schedule')  # continued as it was trained
OFF = '--config.data.small_corpus_mb=0'


def corpus_mb(cfg: ml_collections.ConfigDict) -> float | None:
    """MB on disk of data.train_files when it names text files of the user's; None for a
    mixture, a named corpus or a TFDS/HF dataset (the rule does not apply to them)."""
    d = cfg.data
    spec = d.train_files.strip()
    if d.get('mixture', '') or spec in data.PRETRAIN_CORPORA or corpus.is_indexed(spec):
        return None
    files = data.resolve_sources(cfg)[0].train
    return sum(epath.Path(f).stat().length for f in files) / MB


def resolve(cfg: ml_collections.ConfigDict, workdir: str,
            build: Callable[[ml_collections.ConfigDict, str], object],
            say: Callable[[str], None]) -> ml_collections.ConfigDict:
    """`cfg` as given, or (a small corpus of the user's) a copy that continues the general
    encoder; `build(config, workdir)` pretrains the cache's encoder when it is missing,
    `say` prints the one line of the choice. One-line ConfigError on bad keys."""
    d = cfg.data
    threshold, choice = d.get('small_corpus_mb', 0.0), d.get('small_corpus_choice', '')
    if cfg.init_from:  # the user's own continued run, or a saved config.json run again
        return cfg
    if choice:
        raise ConfigError(f'data.small_corpus_choice: {choice!r} is written by the run (what '
                          'data.small_corpus_mb chose); leave it empty')
    if threshold < 0:
        raise ConfigError(f'data.small_corpus_mb: must be >= 0 (0 = off), got {threshold}')
    saved = _saved_choice(workdir)
    if not threshold or saved == '':
        return cfg
    size = corpus_mb(cfg)
    if size is None or (saved is None and size >= threshold):
        return cfg
    encoder, note = _encoder(d.small_corpus_encoder)
    say(f'small corpus: {size:.2f} MB of text < data.small_corpus_mb={threshold:g}: '
        f'continuing the general encoder {encoder}{note} for {CONTINUE["num_train_steps"]} '
        f'steps (learning rate {CONTINUE["optimizer.learning_rate"]:g}, warm-up '
        f'{CONTINUE["optimizer.warmup_steps"]}) instead of training from scratch; {OFF} '
        'turns this off')
    if note:
        build(get_config(GENERAL_ENCODER), str(encoder))
    return continued(cfg, encoder)


def continued(cfg: ml_collections.ConfigDict, encoder: epath.Path) -> ml_collections.ConfigDict:
    """A copy of `cfg` continuing `encoder` with the measured settings, the choice recorded."""
    out = copy.deepcopy(cfg)
    out.init_from = str(encoder)
    out.data.small_corpus_choice = CHOICE
    saved = RunDir(encoder).read_config()
    values = {**CONTINUE, **{key: _get(saved, key) for key in FROM_ENCODER}}
    for key, value in values.items():
        *parents, leaf = key.split('.')
        section = out
        for name in parents:
            section = section[name]
        section[leaf] = value
    return out


def cache_encoder() -> epath.Path:
    """Where the `general` encoder is built once: $BERTJAX_CACHE/encoders/CACHE_NAME."""
    return epath.Path(default_cache_dir()) / 'encoders' / CACHE_NAME


def _encoder(named: str) -> tuple[epath.Path, str]:
    """(the encoder's workdir, '' or the note that it is built now)."""
    if named:
        root = absolute_path(named)
        problem = _problem(root)
        if problem:
            raise ConfigError(f'data.small_corpus_encoder: {named!r} {problem}; build it with '
                              f'`launch.py pretrain --config configs/pretrain.py:'
                              f'{GENERAL_ENCODER} --workdir {named}`, or {OFF}')
        return root, ''
    root = absolute_path(cache_encoder())
    if _complete(root):
        return root, ''
    return root, (' (not built yet: building it once now with configs/pretrain.py:'
                  f'{GENERAL_ENCODER}, about 25 minutes on 2 CPU cores)')


def _problem(root: epath.Path) -> str:
    """Why `root` cannot be continued ('' = it can)."""
    if not root.is_dir():
        return 'is no directory'
    run = RunDir(root)
    if run.tokenizer_file() is None or not run.config_file.is_file():
        return 'has no tokenizer or config.json (not a pretraining workdir)'
    if run.latest_step() is None:
        return 'holds no checkpoint'
    return ''


def _complete(root: epath.Path) -> bool:
    """A built cache encoder: its last checkpoint is its config's last step."""
    if not root.is_dir() or _problem(root):
        return False
    run = RunDir(root)
    return run.latest_step() == run.read_config()['num_train_steps']


def _saved_choice(workdir: str) -> str | None:
    """A resumed run keeps the choice it was started with (the corpus may have grown since):
    None for a new run; '' for a run without the rule (started with it off, on a large
    corpus, before the key existed, or made by `launch.py import`)."""
    saved = resume_check.saved_config(absolute_path(workdir))
    return None if saved is None else saved.get('data', {}).get('small_corpus_choice', '')


def _get(cfg: ml_collections.ConfigDict, key: str):
    for name in key.split('.'):
        cfg = cfg[name]
    return cfg
