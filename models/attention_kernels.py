"""Scaled dot-product attention kernels and the attention structure they read.

`AttentionInputs` is what the model hands each attention layer instead of a dense mask: the
(B, L) padding mask, the optional (B, L) segment ids of packed documents and the layer's
local window. Each kernel turns it into what it supports natively:

    explicit  materialised float32 (B, heads, L, L) scores with a dense boolean mask; the
              only path with attention dropout.
    xla       ``jax.nn.dot_product_attention(implementation='xla')`` with the dense mask.
    cudnn     ``implementation='cudnn'``: padding as ``key_value_seq_lengths`` when there
              are no segment ids (rows are right-padded, real tokens first, as every batch
              this project builds), otherwise the dense mask (cuDNN turns it into a bias).
              jax 0.10.2's cuDNN call takes only a left (causal) window, so the symmetric
              local window is a dense mask there too: on GPU it saves no work.
    splash    the Pallas TPU splash-attention kernel: padding and packed documents as
              segment ids, the window as a `LocalMask`, so masked blocks are skipped. The
              sequence is padded to a multiple of 128 (the kernel's block) and cut back.

Outputs at padding query positions differ between kernels (no kernel defines them); every
real query position agrees.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
SPLASH_BLOCK = 128  # the splash kernel's tile along q and kv; the length is padded to it


@struct.dataclass
class AttentionInputs:
    """The attention structure of one layer: what to attend to, not a dense mask.

    window: 0 = full attention; W > 0: keys with |i - j| <= W // 2. is_global: None when
    `window` is this layer's (static); a traced bool (scanned layers) that switches the
    window off for global layers.
    """

    attention_mask: Array  # (B, L) 1 = real token
    segment_ids: Array | None = None  # (B, L) packed documents; None = one per row
    window: int = struct.field(pytree_node=False, default=0)
    is_global: Array | None = None

    def for_layer(self, window: int, is_global: Array | bool | None = None) -> AttentionInputs:
        """This structure with a layer's window (static bool: 0 for global layers)."""
        if isinstance(is_global, bool):
            return self.replace(window=0 if is_global else window, is_global=None)
        return self.replace(window=window, is_global=is_global)

    def dense_mask(self) -> Array:
        """Boolean (B, 1, L, L) mask equal to what the structure allows."""
        mask = make_attention_mask(self.attention_mask, self.segment_ids)
        if not self.window:
            return mask
        local = jnp.logical_and(mask, sliding_window_mask(mask.shape[-1], self.window))
        return local if self.is_global is None else jnp.where(self.is_global, mask, local)


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


def per_layer_window(fn: Callable[..., Array], inputs: AttentionInputs, *args: Array) -> Array:
    """fn(*args, inputs with a static window): a scanned layer's traced global flag picks
    one of two compiled branches (full or windowed), as kernels take the window statically."""
    if inputs.is_global is None or not inputs.window:
        return fn(*args, inputs.replace(is_global=None))
    return jax.lax.cond(inputs.is_global,
                        lambda *a: fn(*a, inputs.replace(window=0, is_global=None)),
                        lambda *a: fn(*a, inputs.replace(is_global=None)), *args)


def cudnn_arguments(inputs: AttentionInputs) -> dict:
    """`jax.nn.dot_product_attention` keyword arguments for a static-window structure:
    ``key_value_seq_lengths`` for padding alone, else a dense ``mask`` (module docstring)."""
    if inputs.segment_ids is None and not inputs.window:
        lengths = jnp.sum(inputs.attention_mask.astype(jnp.int32), axis=-1, dtype=jnp.int32)
        return {'key_value_seq_lengths': lengths}
    return {'mask': inputs.dense_mask()}


def cudnn_attention(q: Array, k: Array, v: Array, inputs: AttentionInputs) -> Array:
    """cuDNN flash attention (GPU, 16-bit); raises when cuDNN rejects the call."""
    def call(q: Array, k: Array, v: Array, layer: AttentionInputs) -> Array:
        return jax.nn.dot_product_attention(q, k, v, implementation='cudnn',
                                            **cudnn_arguments(layer))
    return per_layer_window(call, inputs, q, k, v)


def splash_segment_ids(inputs: AttentionInputs) -> Array:
    """int32 (B, L) ids: padding 0, real tokens their segment + 1 (one segment: 1), so
    equal ids reproduce `make_attention_mask` for every real query."""
    real = inputs.attention_mask.astype(bool)
    segments = (jnp.zeros_like(inputs.attention_mask, jnp.int32) if inputs.segment_ids is None
                else inputs.segment_ids.astype(jnp.int32))
    return jnp.where(real, segments + 1, 0)


def _splash_kernel(heads: int, length: int, window: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU-only; lazy

    if window:
        half = window // 2
        one = sa.LocalMask((length, length), (half, half), 0)
    else:
        one = sa.FullMask((length, length))
    block = SPLASH_BLOCK
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                              block_sizes=sizes, interpret=interpret)


def _splash_local(q: Array, k: Array, v: Array, ids: Array, window: int,
                  interpret: bool) -> Array:
    """Splash on (B, L, heads, head_dim) arrays of one device (or one shard_map shard)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    length = q.shape[1]
    padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
    if padded != length:  # the extra tokens get id 0 (padding): no real query sees them
        pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        ids = jnp.pad(ids, [(0, 0), (0, padded - length)])
    kernel = _splash_kernel(q.shape[2], padded, window, interpret)
    scale = jnp.asarray(1.0 / float(q.shape[-1]) ** 0.5, q.dtype)  # splash does not scale

    def one(q: Array, k: Array, v: Array, ids: Array) -> Array:  # (heads, L, head_dim)
        return kernel(q * scale, k, v, segment_ids=SegmentIds(q=ids, kv=ids))

    heads_first = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    out = jax.vmap(one)(*heads_first, ids)
    return jnp.swapaxes(out, 1, 2)[:, :length]


def _mesh_size(mesh, axes) -> int:
    """Devices along `axes` (None, a name or a tuple of names) of `mesh`."""
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


def splash_attention(q: Array, k: Array, v: Array, inputs: AttentionInputs,
                     interpret: bool = False) -> Array:
    """Splash attention (TPU; `interpret=True` runs the same kernel anywhere, slowly).

    Under a mesh of several devices the kernel runs per shard (shard_map) on the batch and
    heads shardings the logical axis rules give; the length must not be sharded.
    """
    ids = splash_segment_ids(inputs)
    mesh = jax.sharding.get_abstract_mesh()
    sharded = not mesh.empty and mesh.size > 1
    if sharded:
        spec = nn.logical_to_mesh_axes(('batch', 'length', 'heads', 'kv'))
        if spec[1] is not None or spec[3] is not None:
            raise ValueError('attention_impl=splash needs the length and head_dim unsharded; '
                             f'the logical rules shard them as {spec}')
        qkv = jax.sharding.PartitionSpec(spec[0], None, spec[2], None)
        rows = jax.sharding.PartitionSpec(spec[0], None)
        # The init traces the model on one row, which no data-parallel mesh divides: such a
        # call runs unsharded (XLA replicates it) rather than failing shard_map's check.
        sharded = (q.shape[0] % _mesh_size(mesh, spec[0]) == 0
                   and q.shape[2] % _mesh_size(mesh, spec[2]) == 0)

    def call(q: Array, k: Array, v: Array, ids: Array, layer: AttentionInputs) -> Array:
        def local(q: Array, k: Array, v: Array, ids: Array) -> Array:
            return _splash_local(q, k, v, ids, layer.window, interpret)
        if not sharded:
            return local(q, k, v, ids)
        return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                             check_vma=False)(q, k, v, ids)

    return per_layer_window(call, inputs, q, k, v, ids)
