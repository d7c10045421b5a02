"""Loading a pretrained BERT into a freshly initialised model (big_vision's `load` idea).

`load(params, read, ...)` returns `params` with the encoder parts a checkpoint holds read
in, on the shardings `params` already have; `read(target)` restores a target tree's leaves
(engine.checkpoint.subtree_reader), so the model never imports the checkpoint format. What
stays as initialised is explicit: the parts not named, every leaf whose path `dont_load`
accepts (parameters the pretrained model never had: LoRA, adapters, prefixes), and nothing
else. `layer_map` lets a model read its layer i from another saved layer (a shallower
student starting from every other layer of its teacher).

`load_whole(target, read, resize)` reads a whole model (continued pretraining), with a hook
for the leaves whose saved shape differs from this model's (a vocabulary resized to a new
tokenizer): they are read as saved, mapped by the hook, and placed on the target's shardings.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from models.paths import prune
from models.scan import SCANNED_NAME, unstack_layers

ENCODER_PARTS = ('embeddings', 'encoder')  # what a pretraining run contributes


def overlay_leaves(tree: dict, update: dict) -> dict:
    """`tree` with the leaves `update` has replaced (a recursive dict merge). A key of
    `update` that `tree` lacks is a KeyError: a loaded weight never lands nowhere."""
    unknown = update.keys() - tree.keys()
    if unknown:
        raise KeyError(f'no such parameter {sorted(unknown)[0]!r}')
    return {key: (overlay_leaves(value, update[key]) if isinstance(value, dict)
                  else update.get(key, value)) if key in update else value
            for key, value in tree.items()}


def _onto(tree: dict, like: dict) -> dict:
    """`tree`'s arrays placed with the shardings of the same leaves of `like`."""
    return {k: _onto(v, like[k]) if isinstance(v, dict) else jax.device_put(v, like[k].sharding)
            for k, v in tree.items()}


def _rename_layers(encoder: dict, names: dict[str, str]) -> dict:
    return {names.get(key, key): value for key, value in encoder.items()}


def _stacked(layer: dict, count: int) -> dict:
    """The restore target of `count` scanned layers shaped like `layer` (one unrolled layer):
    a leading axis, unsharded, in front of each leaf's own layout."""
    def one(x):
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.ShapeDtypeStruct((count, *x.shape), x.dtype, sharding=sharding)
    return jax.tree.map(one, layer)


def load(params: dict, read: Callable[[dict], Any], *,
         parts: Sequence[str] = ENCODER_PARTS, layer_map: dict[str, str] | None = None,
         dont_load: Callable[[str], bool] | None = None, saved_layers: int = 0) -> dict:
    """`params` (with a 'bert' subtree) with params['bert'][part] for each part read by
    `read` ({'params': {'bert': target}} -> the same tree of arrays, from one checkpoint).

    layer_map: {our 'layer_i': saved 'layer_j'} where they differ.
    dont_load: whether a path like 'bert/encoder/layer_0/.../lora_a' is a leaf that keeps
    its initial value (e.g. models.peft.is_peft_path). Raises ValueError when a saved shape differs.
    saved_layers > 0: the checkpoint's encoder is scanned (models/scan.py) with that many
    layers; it is read stacked and unrolled into our per-layer names."""
    names = layer_map or {}
    ours = {part: params['bert'][part] for part in parts}
    if 'encoder' in ours:
        ours['encoder'] = _rename_layers(ours['encoder'], names)  # named as saved
    wanted = prune(ours, dont_load or (lambda path: False), 'bert/')
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), wanted)
    if saved_layers and 'encoder' in target:
        encoder = target['encoder']
        layers = [k for k in encoder if k.startswith('layer_')]
        target['encoder'] = {**{k: v for k, v in encoder.items() if k not in layers},
                             SCANNED_NAME: _stacked(encoder[layers[0]], saved_layers)}
    loaded = read({'params': {'bert': target}})['params']['bert']
    if 'encoder' in loaded:
        encoder = unstack_layers(loaded['encoder'])
        if saved_layers:  # only the layers this model has (a student may have fewer)
            encoder = {k: v for k, v in encoder.items() if k in ours['encoder']}
        loaded['encoder'] = _rename_layers(encoder, {v: k for k, v in names.items()})
        if saved_layers:  # slices of the stacked arrays onto each layer's own sharding
            loaded['encoder'] = _onto(loaded['encoder'], params['bert']['encoder'])
    fresh = {part: params['bert'][part] for part in parts}
    return {**params, 'bert': {**params['bert'], **overlay_leaves(fresh, loaded)}}


Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Resize:
    """Leaves saved with other shapes than this model's: `saved` {path: the saved
    ShapeDtypeStruct, with the sharding to read it onto}; `apply` {path: saved value} ->
    {path: this model's value (numpy; cast to the target's dtype)}, all at once: the word
    embeddings and the output bias follow the same vocabulary map."""
    saved: Mapping[Path, jax.ShapeDtypeStruct]
    apply: Callable[[dict[Path, Any]], dict[Path, Any]]


def load_whole(target: dict, read: Callable[[dict], Any], resize: Resize | None = None
               ) -> dict:
    """Every leaf of `target` (ShapeDtypeStructs with shardings: {'bert': ..., heads}) read
    by `read`; the leaves `resize` names read as saved, then mapped by it onto the target's
    shapes and shardings. Raises ValueError when another saved shape differs."""
    if resize is None:
        return read({'params': target})['params']
    wanted = target
    for path, saved in resize.saved.items():
        wanted = _replace(wanted, path, saved)
    params = read({'params': wanted})['params']
    mapped = resize.apply({path: _get(params, path) for path in resize.saved})
    for path, value in mapped.items():
        like = _get(target, path)
        value = jax.device_put(value.astype(like.dtype), like.sharding)
        params = _replace(params, path, value)
    return params


def _get(tree: dict, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def _replace(tree: dict, path: Path, value) -> dict:
    head, *rest = path
    return {**tree, head: _replace(tree[head], tuple(rest), value) if rest else value}
