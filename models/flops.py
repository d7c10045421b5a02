"""Analytic model-FLOP counts for BERT MLM training (used for MFU reporting).

Only matmuls are counted, at 2 FLOPs per multiply-add. Per sequence of length ``S`` with hidden
size ``H``, intermediate size ``I``, vocab ``V``, ``P`` masked positions and ``N`` layers::

    per layer:
        q, k, v projections        3 * 2*S*H*H
        attention output proj          2*S*H*H
        scores  Q K^T                  2*S*S*H      (all heads: heads * S*S*head_dim)
        weights . V                    2*S*S*H
        FFN (H->I and I->H)        2 * 2*S*H*I
        gated FFN (geglu/swiglu:
          H->2I and I->H)          3 * 2*S*H*I
    MLM head (only at the P masked positions):
        transform dense                2*P*H*H
        tied vocab decoder             2*P*H*V

    forward = batch * (N * per_layer + mlm_head)
    train   = 3 * forward   (backward ~ 2x forward: grads w.r.t. activations and weights)

Embedding lookups, LayerNorm, softmax, GELU, dropout and biases are not counted; attention is
counted over the full S x S score matrix regardless of padding, segment masking or a sliding
window (a local layer still computes, then masks, every score). RoPE's rotations are
elementwise, hence not counted either.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from models.config import BertConfig


def _layer_flops(config: BertConfig, seq_len: int) -> int:
    """Forward matmul FLOPs of one encoder layer for one sequence."""
    s, h, i = seq_len, config.hidden_size, config.intermediate_size
    qkv = 3 * 2 * s * h * h
    attn_out = 2 * s * h * h
    scores = 2 * s * s * h
    weighted_values = 2 * s * s * h
    # A gated MLP's up projection is twice as wide (input and gate halves).
    ffn = (3 if config.gated_mlp else 2) * 2 * s * h * i
    return qkv + attn_out + scores + weighted_values + ffn


def _mlm_head_flops(config: BertConfig, num_masked: int) -> int:
    """Forward matmul FLOPs of the MLM head for one sequence (masked positions only)."""
    h, v = config.hidden_size, config.vocab_size
    return 2 * num_masked * h * h + 2 * num_masked * h * v


def forward_flops(config: BertConfig, batch_size: int, seq_len: int, num_masked: int) -> float:
    """Forward-pass matmul FLOPs of BertForMaskedLM for one batch (see module docstring)."""
    per_seq = config.num_layers * _layer_flops(config, seq_len)
    per_seq += _mlm_head_flops(config, num_masked)
    return float(batch_size * per_seq)


def train_flops_per_step(
    config: BertConfig, batch_size: int, seq_len: int, num_masked: int
) -> float:
    """Model FLOPs of one training step: forward + backward = 3 x forward matmul FLOPs."""
    return 3.0 * forward_flops(config, batch_size, seq_len, num_masked)


def count_params(params: Any) -> int:
    """Total number of scalar parameters in a pytree.

    Works on arrays, ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``) and on trees boxed with
    ``nn.LogicallyPartitioned`` (boxes are pytrees whose leaves are the values).
    """
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)))
