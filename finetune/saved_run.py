"""A saved run's model, read back as float32 numpy: `export` and `embed` both open a workdir here.

A pretraining workdir gives its MLM (or ELECTRA) model at its latest checkpoint (or a given
step); a fine-tuning workdir (model.json and task.json) gives its head at its best checkpoint.
Scanned layers come back per layer and LoRA merged into the kernels, as transformers has them.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from engine.checkpoint import read_state_numpy
from engine.errors import ConfigError
from engine.rundir import RunDir, step_dirs
from models.bert import BertConfig
from models.config import model_config
from models.scan import unstack_layers

# The head of a fine-tuning run of each task (models/heads.py: transformers' names).
FINETUNED_HEADS = {'token_classification': 'token_classifier', 'extractive_qa': 'qa'}


def checkpoint_dir(workdir: epath.Path, head: str, step: int | None
                   ) -> tuple[epath.Path, int]:
    """Where `step` (default: the latest, or a fine-tuning run's best) is saved."""
    run = RunDir(workdir)
    finetuned = head in ('classifier', *FINETUNED_HEADS.values())
    places = [run.best, run.checkpoints] if finetuned else [run.checkpoints]
    for place in places:
        saved = step_dirs(place)
        if saved and (step is None or step in saved):
            return place, saved[-1] if step is None else step
    found = {p.name: step_dirs(p) for p in places}
    wanted = f'step {step}' if step is not None else 'any checkpoint'
    raise ConfigError(f'--step: no {wanted} in {workdir} (have {found})')


def load_workdir(workdir: epath.Path, step: int | None
                 ) -> tuple[str, BertConfig, dict, dict, int]:
    """(head, model config, params, task info, step) of a pretraining or fine-tuning run."""
    run = RunDir(workdir)
    if not run.config_file.is_file() or run.tokenizer_file() is None:
        raise ConfigError(f'--workdir: {workdir} has no config.json and tokenizer; is it a '
                          'pretraining or fine-tuning run?')
    finetuned = run.model_config_file.is_file() and run.task_file.is_file()
    head = 'classifier' if finetuned else 'mlm'
    if finetuned:
        model_cfg = model_config(run.read_model_config())
        task = run.read_task()
        head = FINETUNED_HEADS.get(task.get('task'), head)  # per-token heads
    else:
        config = run.read_config()
        head = {'mlm': 'mlm', 'electra': 'electra'}.get(config.get('objective', 'mlm'), '')
        if not head:
            raise ConfigError(f"--workdir: an objective={config['objective']} run has no "
                              'transformers counterpart; fine-tune it (init_from) and export '
                              'that')
        model_cfg = model_config(config['model'])
        task = {}
    directory, step = checkpoint_dir(workdir, head, step)
    absl = logging.getLogger('absl')  # orbax warns that it reads only part of each step
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        params = read_state_numpy(str(directory), step)['params']
    finally:
        absl.setLevel(level)
    # transformers checkpoints are float32; a model.param_dtype=bfloat16 run widens exactly.
    params = jax.tree.map(lambda x: x.astype(np.float32) if x.dtype == jnp.bfloat16
                          else x, params)
    if model_cfg.scan_layers:  # per-layer names for the name map, as transformers has them
        params['bert']['encoder'] = unstack_layers(params['bert']['encoder'])
        model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
    if finetuned:
        from models.peft import merge_lora, merged_config  # LoRA folds into the kernels
        params, model_cfg = merge_lora(params, model_cfg), merged_config(model_cfg)
    if model_cfg.adapter_size or model_cfg.prefix_length:
        raise ConfigError('--workdir: adapters and prefixes (peft.method adapter/prefix) have '
                          'no transformers BERT counterpart; LoRA runs export merged')
    return head, model_cfg, params, task, step
