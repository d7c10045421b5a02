"""ELECTRA (Clark et al. 2020): a small generator MLM and a replaced-token discriminator.

One flax module holds both, so the usual init / checkpoint / sharding code sees one params
tree:

    params['bert']                      the discriminator's encoder: the pretrained encoder
                                        that fine-tuning (init_from) and models/load.py read
    params['discriminator_predictions'] its per-token binary head (dense -> gelu -> 1 logit,
                                        as HF's ElectraDiscriminatorPredictions)
    params['generator']                 a whole BertForMaskedLM ('bert' + 'cls') of
                                        `generator_config`'s size

Embeddings are not shared between the two. ELECTRA ties the token embeddings (its
generator reads the discriminator's table through a projection when narrower); our BertModel
has no such projection, and a separate table keeps the generator an ordinary
BertForMaskedLM. The paper reports a small gain from tying, which this gives up.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.bert import BertForMaskedLM, BertModel
from models.config import BertConfig
from models.flops import forward_flops
from models.layers import dense

Array = jax.Array


def generator_config(config: BertConfig, size: float) -> BertConfig:
    """The generator: `config` with hidden size, heads and intermediate size scaled by
    `size` (ELECTRA's 1/4 for base: same depth and head width, fewer heads). Raises
    ValueError when `size` is outside (0, 1] or gives an invalid model."""
    if not 0 < size <= 1:
        raise ValueError(f'generator_size must be in (0, 1], got {size}')
    heads = max(1, round(config.num_heads * size))
    hidden = max(heads, round(config.hidden_size * size / heads) * heads)
    return dataclasses.replace(config, hidden_size=hidden, num_heads=heads,
                               intermediate_size=max(1, round(config.intermediate_size * size)))


class DiscriminatorHead(nn.Module):
    """(B, L, H) hidden states -> (B, L) float32 logits of 'this token was replaced'."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        cfg = self.config
        h = dense(cfg, cfg.hidden_size, ('embed', None), name='dense')(hidden)
        h = jax.nn.gelu(h, approximate=False)
        # One output feature: its axis stays unsharded; the bias is the replaced prior.
        logits = dense(cfg, 1, ('embed', None), name='dense_prediction', use_bias=True)(h)
        return logits[..., 0].astype(jnp.float32)


class ElectraForPretraining(nn.Module):
    """Both models; `__call__` (used by init) runs both on the same inputs."""

    config: BertConfig
    generator_config: BertConfig

    def setup(self) -> None:
        self.bert = BertModel(self.config, add_pooling_layer=False)
        self.discriminator_predictions = DiscriminatorHead(self.config)
        self.generator = BertForMaskedLM(self.generator_config)

    def generate(self, input_ids: Array, masked_positions: Array, attention_mask: Array,
                 segment_ids: Array, deterministic: bool = True) -> Array:
        """Generator MLM logits (B, P, vocab) at `masked_positions`."""
        return self.generator(input_ids, masked_positions, attention_mask=attention_mask,
                        segment_ids=segment_ids, deterministic=deterministic)

    def discriminate(self, input_ids: Array, attention_mask: Array, segment_ids: Array,
                     deterministic: bool = True) -> Array:
        """Discriminator logits (B, L): > 0 means 'replaced'."""
        seq, _ = self.bert(input_ids, None, attention_mask, segment_ids,
                           deterministic=deterministic)
        return self.discriminator_predictions(seq)

    def __call__(self, input_ids: Array, masked_positions: Array,
                 attention_mask: Array | None = None, segment_ids: Array | None = None,
                 deterministic: bool = True) -> tuple[Array, Array]:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        gen = self.generate(input_ids, masked_positions, attention_mask, segment_ids,
                            deterministic)
        return gen, self.discriminate(input_ids, attention_mask, segment_ids, deterministic)


def electra_train_flops(config: BertConfig, generator: BertConfig, batch_size: int,
                        seq_len: int, num_masked: int) -> float:
    """Model FLOPs of one ELECTRA training step, both models (3 x forward, as
    models/flops.py): the generator with its MLM head at the masked positions, the
    discriminator's encoder and its head's two matmuls (H x H, H x 1) at every position.
    Sampling the replacements is not a matmul and is not counted."""
    h = config.hidden_size
    head = batch_size * (2 * seq_len * h * h + 2 * seq_len * h)
    forward = (forward_flops(generator, batch_size, seq_len, num_masked)
               + forward_flops(config, batch_size, seq_len, 0) + head)
    return 3.0 * forward
