"""Tests for models/flops.py against hand counts."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from models.bert import BertConfig, BertForMaskedLM
from models.flops import count_params, forward_flops, train_flops_per_step

SMALL = BertConfig(
    vocab_size=100, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256
)


def test_train_flops_hand_count():
    batch, seq, masked = 4, 16, 3
    # One layer, one sequence (S=16, H=64, I=256), 2 FLOPs per multiply-add:
    qkv = 3 * 2 * 16 * 64 * 64  # 393_216
    attn_out = 2 * 16 * 64 * 64  # 131_072
    scores = 2 * 16 * 16 * 64  # 32_768  (2 heads x 16x16 scores x head_dim 32)
    weighted_values = 2 * 16 * 16 * 64  # 32_768
    ffn = 2 * 16 * 64 * 256 + 2 * 16 * 256 * 64  # 1_048_576
    per_layer = qkv + attn_out + scores + weighted_values + ffn
    assert per_layer == 1_638_400
    # MLM head at the P=3 masked positions only (V=100).
    transform = 2 * 3 * 64 * 64  # 24_576
    decoder = 2 * 3 * 64 * 100  # 38_400
    per_sequence = 2 * per_layer + transform + decoder
    assert per_sequence == 3_339_776
    forward = batch * per_sequence  # 13_359_104
    expected_train = 3 * forward  # forward + backward (2x forward)
    assert expected_train == 40_077_312

    assert forward_flops(SMALL, batch, seq, masked) == pytest.approx(forward)
    assert train_flops_per_step(SMALL, batch, seq, masked) == pytest.approx(expected_train)
    assert isinstance(train_flops_per_step(SMALL, batch, seq, masked), float)


def test_flops_scaling():
    base = train_flops_per_step(SMALL, 4, 16, 3)
    assert train_flops_per_step(SMALL, 8, 16, 3) == pytest.approx(2 * base)
    deeper = dataclasses.replace(SMALL, num_layers=4)
    head = 3 * 4 * (2 * 3 * 64 * 64 + 2 * 3 * 64 * 100)
    assert train_flops_per_step(deeper, 4, 16, 3) - head == pytest.approx(2 * (base - head))
    # The vocab projection is only paid at masked positions.
    bigger_vocab = dataclasses.replace(SMALL, vocab_size=1000)
    extra = 3 * 4 * 2 * 3 * 64 * 900
    assert train_flops_per_step(bigger_vocab, 4, 16, 3) - base == pytest.approx(extra)


def _init_shapes(config: BertConfig):
    ids = jnp.zeros((1, 8), jnp.int32)
    positions = jnp.zeros((1, 2), jnp.int32)
    model = BertForMaskedLM(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, positions))['params']


def test_count_params_small_hand_count():
    v, h, i, pos, types = 100, 64, 256, 512, 2
    embeddings = v * h + pos * h + types * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    mlm_head = (h * h + h) + 2 * h + v  # transform dense, LayerNorm, output bias (tied decoder)
    shapes = _init_shapes(SMALL)
    assert count_params(shapes) == embeddings + 2 * layer + mlm_head
    # Boxed (logically partitioned) trees count the same as plain ones.
    assert count_params(shapes) == count_params(nn.unbox(shapes))


def test_count_params_bert_base():
    base = BertConfig(
        vocab_size=30522,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
    )
    # Hugging Face BertForMaskedLM('bert-base-uncased').num_parameters() == 109,514,298.
    assert count_params(_init_shapes(base)) == 109_514_298
