"""Parameter-efficient fine-tuning in the fine-tuning run: config -> model fields and labels.

`peft.method`:
  'none'     the model and training are as without this section
  'lora'     LoRA (rank `peft.rank`, scale `peft.alpha` / rank) on the encoder Dense layers
             `peft.targets` names (query, key, value, attention_output, intermediate, output;
             anything else is a regex on the module path, e.g. 'layer_1/.*/query$')
  'adapter'  bottleneck adapters of width `peft.adapter_size`, placed per
             `peft.adapter_placement` ('houlsby': after attention and FFN; 'pfeiffer': FFN)
  'prefix'   prefix tuning: `peft.prefix_length` learned keys and values in every layer's
             attention (models/peft.py `Prefix`)

Only the LoRA / adapter / prefix parameters and the task head (pooler + classifier) train,
plus every LayerNorm with `peft.train_layer_norm`; the rest is frozen through the same 'train' /
'frozen' labels as `freeze` (which may freeze more on top), so the optimizer keeps state for
the trainable leaves only. The pretrained encoder restores as usual; the new parameters
start fresh (LoRA B and adapter up-projections at zero: step 0 is the pretrained model;
prefixes at small random values).
"""

from typing import Any

import jax
import ml_collections

from engine.errors import ConfigError
from engine.step import FROZEN
from models import peft
from models.config import ADAPTER_PLACEMENTS
from models.paths import is_head, path_of

METHODS = ('none', 'lora', 'adapter', 'prefix')


def method(cfg: ml_collections.ConfigDict) -> str:
    section = cfg.get('peft')
    return 'none' if section is None else section.method


def _targets(value: Any) -> tuple[str, ...]:
    items = value.split(',') if isinstance(value, str) else list(value)
    return tuple(t.strip() for t in items if t.strip())


def model_fields(cfg: ml_collections.ConfigDict) -> dict:
    """The BertConfig fields that switch on `cfg.peft` (empty for method 'none')."""
    name = method(cfg)
    if name not in METHODS:
        raise ConfigError(f'peft.method: {name!r} is not one of {list(METHODS)}')
    p = cfg.get('peft')
    if name == 'lora':
        if p.rank < 1:
            raise ConfigError(f'peft.rank: must be >= 1 for LoRA, got {p.rank}')
        targets = _targets(p.targets)
        if not targets:
            raise ConfigError('peft.targets: name at least one layer for LoRA')
        return {'lora_rank': int(p.rank), 'lora_alpha': float(p.alpha),
                'lora_targets': targets}
    if name == 'adapter':
        if p.adapter_size < 1:
            raise ConfigError(f'peft.adapter_size: must be >= 1, got {p.adapter_size}')
        if p.adapter_placement not in ADAPTER_PLACEMENTS:
            raise ConfigError(f'peft.adapter_placement: {p.adapter_placement!r} is not one of '
                              f'{list(ADAPTER_PLACEMENTS)}')
        return {'adapter_size': int(p.adapter_size), 'adapter_placement': p.adapter_placement}
    if name == 'prefix':
        if p.prefix_length < 1:
            raise ConfigError(f'peft.prefix_length: must be >= 1, got {p.prefix_length}')
        return {'prefix_length': int(p.prefix_length)}
    return {}


def check_targets(params: Any, targets: tuple[str, ...]) -> None:
    """Every LoRA target must have adapted some layer (a typo would silently train nothing)."""
    paths = [path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    adapted = [p.rsplit('/', 1)[0] for p in paths if p.endswith('/lora_a')]
    for target, regex in zip(targets, peft.target_regexes(targets), strict=True):
        if not any(peft.is_lora_target(m, (regex,)) for m in adapted):
            raise ConfigError(f'peft.targets: {target!r} matches no encoder Dense layer')


def labels(params: Any, cfg: ml_collections.ConfigDict, base_labels: Any) -> Any:
    """`base_labels` (from `freeze`) with everything else frozen except the PEFT parameters,
    the head and (with peft.train_layer_norm) LayerNorms. Unchanged for method 'none'."""
    if method(cfg) == 'none':
        return base_labels
    norms = bool(cfg.peft.train_layer_norm)

    def trains(path: str) -> bool:
        return (peft.is_peft_path(path) or is_head(path)
                or (norms and 'LayerNorm' in path.split('/')))

    return jax.tree_util.tree_map_with_path(
        lambda kp, label: label if label == FROZEN or trains(path_of(kp)) else FROZEN,
        base_labels)
