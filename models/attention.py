"""Self-attention: rotary position embeddings, the q/k/v projections and the choice of the
scaled dot-product kernel (the kernels and masks live in models/attention_kernels.py).

Choosing the implementation. `BertConfig.attention_impl` ('auto' by default; 'explicit',
'xla', 'cudnn', 'splash') names it, and `resolve_attention_impl(impl, platform,
dropout_rate, dtype)` turns it into the concrete one for a platform ('cpu', 'gpu', 'tpu'):

    attention dropout > 0 (training only)   explicit (the only kernel with dropout)
    'auto' on cpu                           xla (fused softmax(QK^T)V, as before)
    'auto' on gpu                           cudnn for bfloat16/float16, else xla
    'auto' on tpu                           splash (Pallas)
    any other value                         itself

The layer resolves 'auto' at trace time from ``jax.default_backend()``. Code that builds a
model for another target than the host (compiling for abstract TPU devices from a CPU)
resolves it for that platform and stores the result with
``dataclasses.replace(config, attention_impl=resolve_attention_impl('auto', 'tpu', ...))``;
saved configs keep 'auto'. Prefix tuning (extra keys visible to every query) needs a dense
mask: splash then runs as xla, cuDNN takes the mask as its bias.

The model passes each layer an `AttentionInputs` (padding mask, segment ids, window) rather
than a dense mask; a dense (B, 1, L, L) boolean mask is still accepted (then splash runs as
xla). Where a kernel cannot express the structure natively it gets the dense mask
(models/attention_kernels.py says which).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import peft
from models.attention_kernels import (
    AttentionInputs,
    cudnn_attention,
    explicit_attention,
    make_attention_mask,
    sliding_window_mask,
    splash_attention,
)
from models.config import ATTENTION_IMPLS, BertConfig
from models.layers import dense

__all__ = [
    'AttentionInputs', 'BertSelfAttention', 'explicit_attention', 'fused_attention',
    'make_attention_mask', 'resolve_attention_impl', 'sliding_window_mask',
]

Array = jax.Array
PLATFORMS = ('cpu', 'gpu', 'tpu')
HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve_attention_impl(impl: str, platform: str, dropout_rate: float, dtype) -> str:
    """The concrete kernel ('explicit', 'xla', 'cudnn' or 'splash') for `impl` on `platform`
    with attention dropout `dropout_rate` (0 when deterministic) and compute `dtype`."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f'attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}')
    if platform not in PLATFORMS:
        raise ValueError(f'platform must be one of {PLATFORMS}, got {platform!r}')
    if dropout_rate > 0.0:
        if impl not in ('auto', 'explicit'):
            raise ValueError(f'attention_impl={impl} has no attention dropout; set '
                             'attention_dropout_rate=0 or attention_impl=auto')
        return 'explicit'
    if impl != 'auto':
        return impl
    if platform == 'tpu':
        return 'splash'
    if platform == 'gpu' and jnp.dtype(dtype) in HALF_DTYPES:
        return 'cudnn'
    return 'xla'


def rotary_tables(length: int, head_dim: int, theta: float) -> tuple[Array, Array]:
    """float32 (L, head_dim) cos and sin of RoPE for positions 0..L-1.

    Frequency k (k < head_dim/2) is theta ** (-2k / head_dim); both halves of the last axis
    repeat the same frequencies (``cat(freqs, freqs)``), the layout `rotate_half` expects.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def layer_rotary_tables(cfg: BertConfig, length: int, inputs: AttentionInputs | None
                        ) -> tuple[Array, Array]:
    """This layer's RoPE tables: local_rope_theta's in a local (windowed) layer when set,
    else rope_theta's. A scanned layer's global flag is traced, so both tables are built
    and selected. A dense mask carries no layer kind: rope_theta then."""
    tables = rotary_tables(length, cfg.head_dim, cfg.rope_theta)
    local = cfg.local_rope_theta
    if not local or local == cfg.rope_theta or inputs is None or not inputs.window:
        return tables
    local_tables = rotary_tables(length, cfg.head_dim, local)
    if inputs.is_global is None:  # unrolled: a layer with a window is a local one
        return local_tables
    return tuple(jnp.where(inputs.is_global, g, lo)
                 for g, lo in zip(tables, local_tables, strict=True))


def rotate_half(x: Array) -> Array:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """RoPE on (B, L, heads, head_dim) in float32: x * cos + rotate_half(x) * sin, which
    rotates the pair (x[d], x[d + head_dim/2]) by position * frequency d (the GPT-NeoX /
    transformers ``rotate_half`` convention that ModernBERT uses)."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def fused_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """The 'xla' kernel: ``jax.nn.dot_product_attention`` (XLA's fused softmax(QK^T)V)
    with the dense boolean padding/segment/window mask."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')


def _cudnn_or_xla(q: Array, k: Array, v: Array, inputs: AttentionInputs | None,
                  mask: Array) -> Array:
    try:
        if inputs is None:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='cudnn')
        return cudnn_attention(q, k, v, inputs)
    except (ValueError, NotImplementedError, RuntimeError):
        pass  # cuDNN too old or shape unsupported: checked at trace time, so fall back
    return fused_attention(q, k, v, inputs.dense_mask() if mask is None else mask)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention: q/k/v projections + scaled dot-product (no output proj).
    With ``position_embedding='rope'`` q and k are rotated by their position first."""

    config: BertConfig

    def _split_heads(self, x: Array) -> Array:
        cfg = self.config
        x = x.reshape(*x.shape[:-1], cfg.num_heads, cfg.head_dim)
        return nn.with_logical_constraint(x, ('batch', 'length', 'heads', 'kv'))

    @nn.compact
    def __call__(self, x: Array, mask: Array | AttentionInputs, deterministic: bool) -> Array:
        cfg = self.config
        q, k, v = (
            self._split_heads(dense(cfg, cfg.hidden_size, ('embed', 'heads'), name=n)(x))
            for n in ('query', 'key', 'value')
        )
        inputs = mask if isinstance(mask, AttentionInputs) else None
        if cfg.position_embedding == 'rope':
            cos, sin = layer_rotary_tables(cfg, x.shape[-2], inputs)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        rate = 0.0 if deterministic else cfg.attention_dropout_rate
        impl = resolve_attention_impl(cfg.attention_impl, jax.default_backend(), rate,
                                      cfg.compute_dtype)
        dense_mask = mask if inputs is None else None
        if cfg.prefix_length:  # prefix keys carry no position: they are not rotated
            dense_mask = inputs.dense_mask() if inputs is not None else dense_mask
            k, v, dense_mask = peft.Prefix(cfg, name=peft.PREFIX_NAME)(k, v, dense_mask)
            inputs = None  # only a dense mask can open the prefix to every query
        if impl == 'splash' and inputs is not None:
            out = splash_attention(q, k, v, inputs)
        elif impl == 'cudnn':
            out = _cudnn_or_xla(q, k, v, inputs, dense_mask)
        else:  # explicit; xla (also splash on a dense mask)
            dense_mask = inputs.dense_mask() if dense_mask is None else dense_mask
            if impl == 'explicit':
                drop = nn.Dropout(cfg.attention_dropout_rate, name='attention_dropout')
                out = explicit_attention(q, k, v, dense_mask,
                                         lambda p: drop(p, deterministic=deterministic))
            else:
                out = fused_attention(q, k, v, dense_mask)
        out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'kv'))
        return out.reshape(*out.shape[:-2], cfg.hidden_size)
