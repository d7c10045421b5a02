"""Parameter-efficient fine-tuning layers: LoRA, bottleneck adapters, prefixes; LoRA merging.

Both are switched on by `BertConfig` fields and are off (absent) by default, so the plain
model's parameter tree is unchanged and pretrained checkpoints restore as before.

LoRA (Hu et al. 2021): a targeted Dense layer computes ``x W + b + (x A) B * alpha / rank``
with A (in, rank) random and B (rank, out) zero, so at step 0 the model is the base model.
A and B sit next to the kernel they adapt: ``.../attention/self/query/{kernel,bias,lora_a,
lora_b}``. `merge_lora` folds them into the kernel (``W + A B * alpha / rank``) for export.

Adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): ``h + up(gelu(down(h)))`` applied to a
sublayer's projected (and dropped-out) output before the residual add, with `up` zero-
initialised so the block starts as the identity. 'houlsby' places one after the attention
output and one after the feed-forward output; 'pfeiffer' only after the feed-forward one.
Parameters: ``.../attention/output/adapter/{down,up}/{kernel,bias}``.

Prefix tuning (Li & Liang 2021, with a prefix in every layer's attention as in P-tuning v2):
`prefix_length` learned key and value vectors per layer and head that every query attends
to besides the real tokens; no reparametrisation MLP. Parameters:
``.../attention/self/prefix/{key,value}`` of shape (prefix_length, heads, head_dim). Unlike
LoRA and adapters the model does not start as the base model: the prefixes take a share of
the attention from the first step.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.config import BertConfig
from models.paths import prune

# Short names for the encoder's Dense layers -> regexes on the '/'-joined module path.
TARGET_ALIASES = {
    'query': r'/attention/self/query$',
    'key': r'/attention/self/key$',
    'value': r'/attention/self/value$',
    'attention_output': r'/attention/output/dense$',
    'intermediate': r'/intermediate/dense$',
    'output': r'/layer_\d+/output/dense$',
}
LORA_NAMES = ('lora_a', 'lora_b')
ADAPTER_NAME = 'adapter'
PREFIX_NAME = 'prefix'
_ENCODER = re.compile(r'(^|/)encoder/layer_\d+/')


def target_regexes(targets: Sequence[str]) -> list[str]:
    """Each target as a regex: an alias from `TARGET_ALIASES`, or itself (a regex)."""
    return [TARGET_ALIASES.get(t, t) for t in targets]


def is_lora_target(module_path: str, targets: Sequence[str]) -> bool:
    """Whether the Dense layer at `module_path` (e.g. 'bert/encoder/layer_0/attention/self/
    query') gets LoRA. Only encoder layers do: pooler and classifier train in full anyway."""
    return bool(_ENCODER.search(module_path)) and any(
        re.search(r, module_path) for r in target_regexes(targets))


def lora_scale(config: BertConfig) -> float:
    """alpha / rank (alpha 0 means alpha = rank, a scale of 1)."""
    return (config.lora_alpha or config.lora_rank) / config.lora_rank


class LoraDense(nn.Dense):
    """`nn.Dense` (same params, same maths) plus a LoRA update where `config` targets it."""

    config: Any = None  # BertConfig
    kernel_axes: tuple[str | None, str | None] = (None, None)

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        y = super().__call__(inputs)
        cfg = self.config
        if not is_lora_target('/'.join(self.scope.path), cfg.lora_targets):
            return y
        in_axis, out_axis = self.kernel_axes
        # kaiming-uniform(a=sqrt(5)) as PyTorch / HF PEFT: U(+-1/sqrt(fan_in)).
        a_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')
        a = self.param('lora_a', nn.with_logical_partitioning(a_init, (in_axis, None)),
                       (inputs.shape[-1], cfg.lora_rank), jnp.float32)
        b = self.param('lora_b', nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                              (None, out_axis)),
                       (cfg.lora_rank, self.features), jnp.float32)
        x, a, b = nn.dtypes.promote_dtype(inputs, a, b, dtype=self.dtype)
        delta = (x @ a) @ b
        return y + delta * jnp.asarray(lora_scale(cfg), delta.dtype)


def wants_adapter(config: BertConfig, ffn: bool) -> bool:
    """Whether the sublayer output (feed-forward if `ffn`, else attention) gets an adapter."""
    return config.adapter_size > 0 and (ffn or config.adapter_placement == 'houlsby')


class Adapter(nn.Module):
    """h + up(gelu(down(h))); `up` starts at zero so the block starts as the identity."""

    config: Any  # BertConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        common = dict(dtype=cfg.compute_dtype, param_dtype=jnp.float32)
        down = nn.Dense(
            cfg.adapter_size, name='down', **common,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.truncated_normal(cfg.initializer_range), ('embed', None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))
        up = nn.Dense(
            h.shape[-1], name='up', **common,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                     (None, 'embed')),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)))
        return h + up(jax.nn.gelu(down(h), approximate=False))


class Prefix(nn.Module):
    """Prepends the learned prefix keys and values to one layer's (B, L, heads, head_dim)
    keys and values, and opens them to every query in the boolean (B, 1, L, L) mask."""

    config: Any  # BertConfig

    @nn.compact
    def __call__(self, k: jax.Array, v: jax.Array, mask: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.config
        shape = (cfg.prefix_length, cfg.num_heads, cfg.head_dim)
        init = nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                            (None, 'heads', 'kv'))

        def prepend(name: str, x: jax.Array) -> jax.Array:
            prefix = self.param(name, init, shape, jnp.float32).astype(x.dtype)
            return jnp.concatenate([jnp.broadcast_to(prefix, (x.shape[0], *shape)), x], axis=1)

        visible = jnp.ones((*mask.shape[:-1], cfg.prefix_length), bool)
        return prepend('key', k), prepend('value', v), jnp.concatenate([visible, mask], -1)


# ----------------------------------------------------------------------------- param trees


def is_peft_path(path: str) -> bool:
    """Whether a '/'-joined parameter path is a LoRA, adapter or prefix parameter."""
    parts = path.split('/')
    return (parts[-1] in LORA_NAMES or ADAPTER_NAME in parts[:-1]
            or PREFIX_NAME in parts[:-1])


def _paths(tree: Any, prefix: str = ''):
    for key, value in tree.items():
        path = f'{prefix}{key}'
        if isinstance(value, dict):
            yield from _paths(value, path + '/')
        else:
            yield path, value


def without_peft(tree: dict) -> dict:
    """A nested dict of parameters without its PEFT leaves (empty dicts dropped)."""
    return prune(tree, is_peft_path)


def count_peft_params(params: dict) -> int:
    return sum(int(v.size) for p, v in _paths(params) if is_peft_path(p))


def merged_config(config: BertConfig) -> BertConfig:
    """The config of `merge_lora`'s output: LoRA off, everything else (adapters) kept."""
    return dataclasses.replace(config, lora_rank=0, lora_alpha=0.0, lora_targets=())


def merge_lora(params: dict, config: BertConfig) -> dict:
    """Folds every LoRA pair into its kernel: ``W + A B * alpha / rank`` (in float32), and
    drops lora_a / lora_b, giving the tree of `merged_config(config)`'s model (plain names).
    Works on numpy or jax arrays, under jit or not; adapter parameters are kept as they are."""
    if not config.lora_rank:
        return params
    scale = lora_scale(config)

    def merge(node: dict) -> dict:
        out = {k: merge(v) if isinstance(v, dict) else v
               for k, v in node.items() if k not in LORA_NAMES}
        if 'lora_a' in node:
            a = jnp.asarray(node['lora_a'], jnp.float32)
            b = jnp.asarray(node['lora_b'], jnp.float32)
            kernel = jnp.asarray(node['kernel'], jnp.float32)
            out['kernel'] = (kernel + (a @ b) * scale).astype(node['kernel'].dtype)
        return out
    return merge(params)
