"""Self-attention: masks (padding, segments, sliding window), rotary position embeddings and
the q/k/v projections with fused or explicit scaled dot-product attention."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import peft
from models.config import BertConfig
from models.layers import dense

Array = jax.Array


def make_attention_mask(attention_mask: Array, segment_ids: Array | None = None) -> Array:
    """Boolean (B, 1, L, L) mask: keys must be real tokens (and in the query's segment)."""
    keys = attention_mask.astype(bool)[:, None, None, :]
    if segment_ids is None:
        length = attention_mask.shape[-1]
        return jnp.broadcast_to(keys, (*attention_mask.shape[:-1], 1, length, length))
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jnp.logical_and(same, keys)


def sliding_window_mask(length: int, window: int) -> Array:
    """Boolean (1, 1, L, L) band: query i may see key j when |i - j| <= window // 2.

    `window` counts the tokens of the whole band as ModernBERT's ``local_attention`` does
    (its mask is ``abs(q - k) <= local_attention // 2``).
    """
    pos = jnp.arange(length)
    band = jnp.abs(pos[:, None] - pos[None, :]) <= window // 2
    return band[None, None]


def rotary_tables(length: int, head_dim: int, theta: float) -> tuple[Array, Array]:
    """float32 (L, head_dim) cos and sin of RoPE for positions 0..L-1.

    Frequency k (k < head_dim/2) is theta ** (-2k / head_dim); both halves of the last axis
    repeat the same frequencies (``cat(freqs, freqs)``), the layout `rotate_half` expects.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


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
    """``jax.nn.dot_product_attention``: cuDNN flash attention on GPU for 16-bit inputs (the
    boolean padding/segment mask becomes its bias), XLA's fused softmax(QK^T)V elsewhere."""
    if jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='cudnn')
        except (ValueError, NotImplementedError, RuntimeError):
            pass  # cuDNN too old or shape unsupported: checked at trace time, so fall back
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')


def explicit_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    dropout: Callable[[Array], Array] | None = None,
) -> Array:
    """Same maths as ``jax.nn.dot_product_attention`` but with a hook to drop probabilities.

    q/k/v are (B, L, heads, head_dim); mask is boolean, broadcastable to (B, heads, L, L).
    """
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    # A large finite negative (not -inf) keeps fully-masked rows NaN-free, like jax.nn.
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(logits, axis=-1)  # float32 softmax
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention: q/k/v projections + scaled dot-product (no output proj).
    With ``position_embedding='rope'`` q and k are rotated by their position first."""

    config: BertConfig

    def _split_heads(self, x: Array) -> Array:
        cfg = self.config
        x = x.reshape(*x.shape[:-1], cfg.num_heads, cfg.head_dim)
        return nn.with_logical_constraint(x, ('batch', 'length', 'heads', 'kv'))

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        q, k, v = (
            self._split_heads(dense(cfg, cfg.hidden_size, ('embed', 'heads'), name=n)(x))
            for n in ('query', 'key', 'value')
        )
        if cfg.position_embedding == 'rope':
            cos, sin = rotary_tables(x.shape[-2], cfg.head_dim, cfg.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cfg.prefix_length:  # prefix keys carry no position: they are not rotated
            k, v, mask = peft.Prefix(cfg, name=peft.PREFIX_NAME)(k, v, mask)
        if not deterministic and cfg.attention_dropout_rate > 0.0:
            drop = nn.Dropout(cfg.attention_dropout_rate, name='attention_dropout')
            out = explicit_attention(q, k, v, mask, lambda p: drop(p, deterministic=False))
        else:
            out = fused_attention(q, k, v, mask)
        out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'kv'))
        return out.reshape(*out.shape[:-2], cfg.hidden_size)
