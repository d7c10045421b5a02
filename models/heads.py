"""Per-token heads: token classification and extractive question answering.

Both read the encoder's sequence output (no pooler), as transformers'
BertForTokenClassification (`classifier`) and BertForQuestionAnswering (`qa_outputs`, two
outputs: start and end) do, under the same parameter names, so export is a rename.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from models.bert import BertModel
from models.config import BertConfig
from models.layers import dense


def _sequence(cfg: BertConfig, input_ids: Array, token_type_ids: Array | None,
              attention_mask: Array | None, segment_ids: Array | None,
              deterministic: bool) -> Array:
    seq, _ = BertModel(cfg, add_pooling_layer=False, name='bert')(
        input_ids, token_type_ids, attention_mask, segment_ids, deterministic=deterministic)
    return seq


class BertForTokenClassification(nn.Module):
    """Logits (B, L, num_labels) in float32, one row per token."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array | None = None,
                 attention_mask: Array | None = None, segment_ids: Array | None = None, *,
                 deterministic: bool = True) -> Array:
        cfg = self.config
        seq = _sequence(cfg, input_ids, token_type_ids, attention_mask, segment_ids,
                        deterministic)
        seq = nn.Dropout(cfg.dropout_rate)(seq, deterministic=deterministic)
        logits = dense(cfg, cfg.num_labels, ('embed', None), name='classifier',
                       use_bias=True)(seq)
        return logits.astype(jnp.float32)


class BertForQuestionAnswering(nn.Module):
    """Start and end logits (B, L, 2) in float32 (transformers' qa_outputs has no dropout)."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array | None = None,
                 attention_mask: Array | None = None, segment_ids: Array | None = None, *,
                 deterministic: bool = True) -> Array:
        cfg = self.config
        seq = _sequence(cfg, input_ids, token_type_ids, attention_mask, segment_ids,
                        deterministic)
        logits = dense(cfg, 2, ('embed', None), name='qa_outputs', use_bias=True)(seq)
        return logits.astype(jnp.float32)
