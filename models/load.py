"""Loading a pretrained BERT into a freshly initialised model (big_vision's `load` idea).

`load(params, checkpoint_dir, step, ...)` returns `params` with the encoder parts a
checkpoint holds read in, on the shardings `params` already have. What stays as
initialised is explicit: the parts not named, every leaf whose path matches a `dont_load`
regex (parameters the pretrained model never had: LoRA, adapters, prefixes, a new head),
and nothing else. `layer_map` lets a model read its layer i from another saved layer (a
shallower student starting from every other layer of its teacher).
"""

import re
from collections.abc import Sequence

import jax

from engine.checkpoint import restore_subtree

ENCODER_PARTS = ('embeddings', 'encoder')  # what a pretraining run contributes


def _prune(tree: dict, dropped, prefix: str) -> dict:
    """`tree` without the leaves whose path `dropped` matches (empty dicts removed)."""
    out = {}
    for key, value in tree.items():
        path = f'{prefix}{key}'
        if isinstance(value, dict):
            sub = _prune(value, dropped, f'{path}/')
            if sub:
                out[key] = sub
        elif not dropped(path):
            out[key] = value
    return out


def _overlay(tree: dict, update: dict) -> dict:
    """`tree` with the leaves `update` has replaced (a recursive dict merge)."""
    out = dict(tree)
    for key, value in update.items():
        out[key] = _overlay(tree[key], value) if isinstance(value, dict) else value
    return out


def _rename_layers(encoder: dict, names: dict[str, str]) -> dict:
    return {names.get(key, key): value for key, value in encoder.items()}


def load(params: dict, checkpoint_dir: str, step: int | None, *,
         parts: Sequence[str] = ENCODER_PARTS, layer_map: dict[str, str] | None = None,
         dont_load: Sequence[str] = ()) -> dict:
    """`params` (with a 'bert' subtree) with params['bert'][part] for each part read from
    the checkpoint in `checkpoint_dir` at `step` (None = the latest).

    layer_map: {our 'layer_i': saved 'layer_j'} where they differ.
    dont_load: regexes (re.search) over paths like 'bert/encoder/layer_0/.../lora_a' whose
    leaves keep their initial values. Raises ValueError when a saved shape differs."""
    names = layer_map or {}
    patterns = [re.compile(p) for p in dont_load]
    ours = {part: params['bert'][part] for part in parts}
    if 'encoder' in ours:
        ours['encoder'] = _rename_layers(ours['encoder'], names)  # named as saved
    wanted = _prune(ours, lambda path: any(p.search(path) for p in patterns), 'bert/')
    target = {'params': {'bert': jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), wanted)}}
    loaded = restore_subtree(checkpoint_dir, step, target)['params']['bert']
    if 'encoder' in loaded:
        loaded['encoder'] = _rename_layers(loaded['encoder'], {v: k for k, v in names.items()})
    fresh = {part: params['bert'][part] for part in parts}
    return {**params, 'bert': {**params['bert'], **_overlay(fresh, loaded)}}
