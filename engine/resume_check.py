"""What a resumed run may change: the new resolved config against the workdir's config.json.

A run resumes when its workdir holds checkpoints. Everything that decides what the saved
weights, optimizer state and data position mean (the model's shapes, the tokenizer and
vocabulary, seq_len, the data recipe, masking, seed, batch_size, the optimizer) must be
what the run was started with: a checkpoint restored under other values either fails deep
in orbax or, worse, trains on silently (4 heads on 2-head weights whose shapes happen to
fit; another seq_len reusing the old data position). Only the keys of an explicit
allow-list may change (budgets, cadences, the mesh, logging); a key added to a config
later is refused by default, unless ADDED_KEYS names the value that means what runs did
before it existed. The comparison runs before the resumed run writes anything,
so a refused command leaves every file of the workdir as it was.

Both sides are compared as JSON (what config.json holds), after the code resolved its auto
values (fine-tuning's learning_rate=0 and num_epochs=0) the same way on every run.
"""

from __future__ import annotations

import json
from typing import Any

from engine.errors import ConfigError
from engine.rundir import RunDir, config_text

# Keys (or whole sections) a resumed pretraining run may change. Budgets and cadences do
# not change what a step computes; the mesh, micro-batching and remat change how, not what;
# model.dtype and model.attention_impl are the precision and kernel of the hardware at hand
# (params stay float32);
# data.data_dir and data.workers say where and how fast the (deterministic) preparation
# runs, data.cache_mb how much of a bucket's corpus a host keeps on its disk.
# seq_len_phases / batch_size_ramp runs also keep num_train_steps (pretrain/phases.py).
PRETRAIN_CHANGEABLE = (
    'num_train_steps', 'max_runtime', 'train_tokens', 'log_every_steps', 'eval_every_steps',
    'eval_max_batches', 'checkpoint_every_steps', 'keep_checkpoints', 'nan_rollbacks',
    'peak_flops_per_device', 'profile_steps', 'wandb', 'mesh', 'grad_accum_steps',
    'model.remat', 'model.dtype', 'model.attention_impl', 'data.data_dir', 'data.workers',
    'data.cache_mb',
    # What the small-corpus rule reads; what it chose (data.small_corpus_choice, init_from and
    # the continued run's settings) is compared.
    'data.small_corpus_mb', 'data.small_corpus_encoder',
)
# Fine-tuning: the budget (num_epochs, patience), cadences and the same runtime keys;
# dynamic padding changes the shapes of batches, not which examples they hold.
FINETUNE_CHANGEABLE = (
    'num_epochs', 'patience', 'log_every_steps', 'eval_every_steps', 'peak_flops_per_device',
    'profile_steps', 'wandb', 'mesh', 'grad_accum_steps', 'model.remat', 'model.dtype',
    'model.attention_impl', 'data.dynamic_padding',
)
# Keys added to the configs after runs were started, each with the value that does what a
# run did before the key existed: a saved config without the key reads as holding it, so
# such a workdir still resumes (with that value, and only with that value).
ADDED_KEYS = {
    'data.text_field': 'text',  # pretraining corpora in JSONL/Parquet
    'data.read_block': 1,  # rows drawn in runs of consecutive sequences (bucket reads)
    'model.param_dtype': 'float32',
    'optimizer.mu_dtype': '',  # pretraining's optimizer section
    'mu_dtype': '',  # fine-tuning's top-level optimizer key
    'model.classifier_head': 'bert',  # pretraining configs and model.json
    'data.doc_stride': 0,  # fine-tuning's extractive QA windows
    'data.max_answer_length': 30,
    'data.small_corpus_choice': '',  # runs before the small-corpus rule trained as configured
}
# Fine-tuning's config.json: '' (init_from's head) is what a run did before the key existed.
FINETUNE_ADDED_KEYS = {**ADDED_KEYS, 'model.classifier_head': ''}
_ABSENT = object()


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; an empty section is one leaf ({})."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def changeable(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == a or key.startswith(a + '.') for a in allowed)


def _show(value: Any) -> str:
    return 'nothing (no such key)' if value is _ABSENT else json.dumps(value)


def saved_config(workdir) -> dict | None:
    """The workdir's config.json as JSON values, when the workdir holds a run to resume
    (a checkpoint, or a fine-tuning run's best one); None for a fresh or unstarted one."""
    run = RunDir(workdir)
    if (run.latest_step() is None and not run.best_steps()) or not run.config_file.exists():
        return None
    try:
        return json.loads(run.config_file.read_text())
    except ValueError as e:
        raise ConfigError(f'--workdir: {run.config_file} is not valid JSON ({e}); it '
                          'describes the run to resume') from None


def compare(new: dict, saved: dict, allowed: tuple[str, ...], workdir, hint: str,
            only: str = '', added: dict | None = None) -> None:
    """A one-line ConfigError naming the first key (sorted) that differs and is not
    `allowed`; `only`: compare just the keys under this prefix (e.g. 'model.'); `added`:
    the ADDED_KEYS to use."""
    added = ADDED_KEYS if added is None else added
    new_flat, saved_flat = flatten(new), flatten(saved)
    for key in sorted(new_flat.keys() | saved_flat.keys()):
        if not key.startswith(only) or changeable(key, allowed):
            continue
        old = saved_flat.get(key, added.get(key, _ABSENT))
        now = new_flat.get(key, _ABSENT)
        if old != now:
            raise ConfigError(f'{key}: the run in {workdir} was started with {_show(old)}, '
                              f'this config says {_show(now)}; a resume cannot change it '
                              f'({hint})')


def check_pretrain(cfg: dict[str, Any], workdir) -> dict | None:
    """`cfg`: the resolved config's values (a ConfigDict's `to_dict()`).
    Refuses (one line) a pretraining resume that changes a key it may not; returns the
    saved config of a run that consumed data (None: nothing to resume, or step 0 only). A
    workdir whose only checkpoint is step 0 (made by `launch.py import`: no data consumed
    yet) only has to keep the model."""
    saved = saved_config(workdir)
    if saved is None:
        return None
    hint = f'start a new workdir, or continue with --config.init_from={workdir}'
    imported = RunDir(workdir).latest_step() == 0
    compare(as_json(cfg), saved, PRETRAIN_CHANGEABLE, workdir, hint,
            'model.' if imported else '')
    return None if imported else saved


def check_finetune(cfg: dict[str, Any], workdir) -> dict | None:
    """As check_pretrain, for a fine-tuning workdir (its checkpoints or best/)."""
    saved = saved_config(workdir)
    if saved is not None:
        compare(_without_aliases(as_json(cfg)), _without_aliases(saved), FINETUNE_CHANGEABLE,
                workdir, 'start a new workdir', added=FINETUNE_ADDED_KEYS)
    return saved


def _without_aliases(config: dict) -> dict:
    """Fine-tuning's `optimizer` section repeats top-level keys (the same settings, compared
    there); a workdir started before the section existed has none."""
    return {k: v for k, v in config.items() if k != 'optimizer'}


def check_file(file, expected: dict, workdir, what: str) -> None:
    """A run's description file (task.json, model.json) must say what this run would
    write; `what` names its content in the message (e.g. 'data: labels')."""
    if not file.exists():
        return
    saved = json.loads(file.read_text())
    for key in sorted(saved.keys() | expected.keys()):
        # A field added later reads as its ADDED_KEYS value ('model.' files: model.json).
        old = saved.get(key, ADDED_KEYS.get(f'{what}{key}', _ABSENT))
        now = expected.get(key, _ABSENT)
        if _json(now) != _json(old):
            raise ConfigError(f'{what}{key}: the run in {workdir} was started with '
                              f'{_show(old)}, now {_show(now)} ({file.name}); a resume cannot '
                              'change it (start a new workdir)')


def _json(value: Any) -> Any:
    return value if value is _ABSENT else json.loads(json.dumps(value))


def as_json(cfg: dict[str, Any]) -> dict:
    """The config's values (a ConfigDict's `to_dict()`) as config.json would hold them
    (tuples as lists, floats round-tripped)."""
    return json.loads(config_text(cfg))
