"""Sentence embeddings: the BERT encoder with its last hidden states pooled, no head.

`pooling` (models/config.py) picks the masked mean of the real tokens ('mean', as
sentence-transformers' Pooling(pooling_mode_mean_tokens)) or the [CLS] row ('cls'). No
pooler dense + tanh: sentence-transformers pools the encoder output itself, so the exported
BertModel + Pooling module compute these same vectors. The parameter tree is
`{'bert': {'embeddings', 'encoder'}}`, the names a pretraining checkpoint has.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.bert import BertModel, mean_pool
from models.config import BertConfig


def pool(sequence_output: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """(B, H) float32: the masked mean of the tokens, or the first ([CLS]) row."""
    if pooling == 'mean':
        return mean_pool(sequence_output, attention_mask)
    return sequence_output[:, 0].astype(jnp.float32)


class BertForSentenceEmbedding(nn.Module):
    """(B, H) float32 pooled embeddings, unnormalised (losses and metrics normalise)."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        sequence, _ = BertModel(self.config, name='bert')(
            input_ids, token_type_ids, attention_mask, segment_ids, deterministic=deterministic)
        return pool(sequence, attention_mask, self.config.pooling)
