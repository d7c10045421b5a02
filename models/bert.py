"""Pure-functional flax.linen BERT encoder with MLM and sequence-classification heads.

The parameter tree mirrors Hugging Face ``BertForMaskedLM`` / ``BertForSequenceClassification``
module names one-to-one so that an exporter only has to rename leaves and transpose kernels.
Every parameter and the main activations carry logical axis names drawn from
``batch, length, embed, mlp, heads, kv, vocab``; without a mesh / rules they are no-ops.

The architecture options of `BertConfig` (RoPE, gated MLP, no biases, final norm, sliding-
window attention, mean pooling; see models/config.py) keep these names: an option changes a
shape or drops a leaf (no position table with RoPE, a 2I-wide intermediate kernel when
gated, no biases), never a path. The building blocks live in models/layers.py and
models/attention.py; their public names are re-exported here for existing callers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import (
    AttentionInputs,
    BertSelfAttention,
    explicit_attention,
    fused_attention,
    make_attention_mask,
    resolve_attention_impl,
    sliding_window_mask,
)
from models.config import REMAT_POLICIES, BertConfig, non_bert_options
from models.layers import (
    BertIntermediate,
    DenseNorm,
    dense,
    embed,
    hidden_constraint,
    layer_norm,
    norm,
    residual,
)
from models.scan import SCANNED_NAME

__all__ = [
    'AttentionInputs', 'BertAttention', 'BertConfig', 'BertEmbeddings', 'BertEncoder',
    'BertForMaskedLM', 'BertForSequenceClassification', 'BertIntermediate', 'BertLayer',
    'BertModel', 'BertOnlyMLMHead', 'BertPooler', 'BertPredictionHead', 'BertSelfAttention',
    'explicit_attention', 'fused_attention', 'make_attention_mask', 'mean_pool',
    'non_bert_options', 'resolve_attention_impl', 'sliding_window_mask',
]

Array = jax.Array


# ----------------------------------------------------------------------------- embeddings


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings -> LayerNorm -> dropout.

    With RoPE there is no position table (positions enter every attention layer instead),
    hence no length limit from one.
    """

    config: BertConfig

    def setup(self) -> None:
        cfg = self.config
        self.word_embeddings = embed(cfg, cfg.vocab_size, ('vocab', 'embed'))
        self.learned_positions = cfg.position_embedding == 'learned'
        if self.learned_positions:
            self.position_embeddings = embed(cfg, cfg.max_position_embeddings, (None, 'embed'))
        self.token_type_embeddings = embed(cfg, cfg.type_vocab_size, (None, 'embed'))
        self.LayerNorm = layer_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
        length = input_ids.shape[-1]
        offset = self.config.position_offset
        if self.learned_positions and length + offset > self.config.max_position_embeddings:
            # jnp indexing would silently clamp the out-of-range position ids.
            raise ValueError(
                f'sequence length {length} > max_position_embeddings '
                f'{self.config.max_position_embeddings}'
                + (f' - position_offset {offset}' if offset else '')
            )
        if self.config.type_vocab_size == 1:  # no token types: a pair's 1s read row 0 too
            token_type_ids = jnp.zeros_like(token_type_ids)
        # Sum in float32: it feeds a float32 LayerNorm anyway.
        x = self.word_embeddings(input_ids).astype(jnp.float32)
        if self.learned_positions:
            positions = jnp.arange(offset, offset + length)[None, :]
            x = x + self.position_embeddings(positions).astype(jnp.float32)
        x = x + self.token_type_embeddings(token_type_ids).astype(jnp.float32)
        x = norm(self.LayerNorm, x, self.config.compute_dtype)
        x = self.dropout(x, deterministic=deterministic)
        return hidden_constraint(x)


# ----------------------------------------------------------------------------- layers


class BertAttention(nn.Module):
    config: BertConfig
    normalize: bool = True  # pre-LN: the LayerNorm before attention (off: first_attention_norm)

    @nn.compact
    def __call__(self, x: Array, mask: Array | AttentionInputs, deterministic: bool) -> Array:
        attn = BertSelfAttention(self.config, name='self')
        out = DenseNorm(self.config, ('heads', 'embed'), name='output')

        def branch(h: Array) -> Array:
            return attn(h, mask, deterministic)

        return residual(out, branch, x, self.config.pre_layer_norm, deterministic,
                        self.normalize)


class BertLayer(nn.Module):
    """One transformer block (post-LN as in BERT, or pre-LN)."""

    config: BertConfig
    attention_norm: bool = True  # False: layer 0 with first_attention_norm=False

    @nn.compact
    def __call__(self, x: Array, mask: Array | AttentionInputs, deterministic: bool) -> Array:
        return self.block(x, mask, deterministic)

    def block(self, x: Array, mask: Array | AttentionInputs, deterministic: bool) -> Array:
        """The block itself, shared with the scanned layer (called in a compact method)."""
        cfg = self.config
        x = BertAttention(cfg, self.attention_norm, name='attention')(x, mask, deterministic)
        x = hidden_constraint(x)
        intermediate = BertIntermediate(cfg, name='intermediate')
        out = DenseNorm(cfg, ('mlp', 'embed'), name='output')
        x = residual(out, intermediate, x, cfg.pre_layer_norm, deterministic)
        return hidden_constraint(x)


def _layer_class(config: BertConfig) -> type[nn.Module]:
    if config.remat == 'none':
        return BertLayer
    # self=0, x=1, mask=2, deterministic=3: `deterministic` drives Python control flow.
    return nn.remat(BertLayer, static_argnums=(3,), policy=REMAT_POLICIES[config.remat])


class ScannedLayer(BertLayer):
    """One step of nn.scan over the layers: the block, with this layer's window switched by
    its (scanned) global flag; `deterministic` is an attribute, as scanned inputs are traced."""

    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, inputs: AttentionInputs, is_global: Array
                 ) -> tuple[Array, None]:
        layer = inputs.for_layer(self.config.local_attention_window, is_global)
        return self.block(x, layer, self.deterministic), None


def _scanned_layers(config: BertConfig, deterministic: bool) -> nn.Module:
    """All layers as one scanned module: params stacked on a leading 'layers' axis (never
    sharded), so compile time does not grow with depth."""
    step = ScannedLayer
    if config.remat != 'none':
        step = nn.remat(ScannedLayer, policy=REMAT_POLICIES[config.remat], prevent_cse=False)
    scan = nn.scan(step, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                   in_axes=(nn.broadcast, 0), length=config.num_layers,
                   metadata_params={nn.PARTITION_NAME: 'layers'})
    return scan(config, deterministic=deterministic, name=SCANNED_NAME)


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, inputs: AttentionInputs, deterministic: bool) -> Array:
        """`inputs`: the padding mask and segment ids; each layer adds its window."""
        cfg = self.config
        layer_cls = _layer_class(cfg)
        window = cfg.local_attention_window
        if cfg.scan_layers:
            flags = jnp.array([cfg.is_global_layer(i) for i in range(cfg.num_layers)])
            x, _ = _scanned_layers(cfg, deterministic)(x, inputs, flags)
        # Separate named layers (no scan) keep the tree one-to-one with HF's encoder.layer.{i}.
        for i in range(0 if cfg.scan_layers else cfg.num_layers):
            layer = inputs.for_layer(window, cfg.is_global_layer(i))
            attention_norm = i > 0 or cfg.first_attention_norm
            x = layer_cls(cfg, attention_norm, name=f'layer_{i}')(x, layer, deterministic)
        if cfg.pre_layer_norm or cfg.final_norm:
            x = norm(layer_norm(cfg, name='final_layer_norm'), x, cfg.compute_dtype)
            x = hidden_constraint(x)
        return x


def mean_pool(sequence_output: Array, attention_mask: Array) -> Array:
    """(B, H) float32 mean of the hidden states of the real (mask 1) tokens of each row."""
    weights = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(sequence_output.astype(jnp.float32) * weights, axis=-2)
    # An all-pad row pools to zeros instead of NaN.
    return total / jnp.maximum(jnp.sum(weights, axis=-2), 1.0)


class BertPooler(nn.Module):
    """dense + tanh on [CLS] (pooling='cls') or on the masked mean of the tokens ('mean');
    classifier_head 'modernbert': dense + GELU + LayerNorm, 'distilbert': dense + ReLU."""

    config: BertConfig

    @nn.compact
    def __call__(self, sequence_output: Array, attention_mask: Array) -> Array:
        cfg = self.config
        if cfg.pooling == 'mean':
            pooled = mean_pool(sequence_output, attention_mask).astype(cfg.compute_dtype)
        else:
            pooled = sequence_output[:, 0]
        x = dense(cfg, cfg.hidden_size, ('embed', None), name='dense')(pooled)
        if cfg.classifier_head == 'modernbert':
            x = jax.nn.gelu(x, approximate=False)
            return norm(layer_norm(cfg, name='LayerNorm'), x, cfg.compute_dtype)
        return jax.nn.relu(x) if cfg.classifier_head == 'distilbert' else jnp.tanh(x)


# ----------------------------------------------------------------------------- models


def _defaults(input_ids: Array, token_type_ids: Array | None, attention_mask: Array | None):
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    return token_type_ids, attention_mask


class BertModel(nn.Module):
    """BERT encoder. Returns ``(sequence_output (B, L, H), pooled_output (B, H) or None)``."""

    config: BertConfig
    add_pooling_layer: bool = False

    def setup(self) -> None:
        # setup (not compact) so heads can reach self.bert.embeddings.word_embeddings.
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config)
        if self.add_pooling_layer:
            self.pooler = BertPooler(self.config)

    def __call__(
        self,
        input_ids: Array,
        token_type_ids: Array | None = None,
        attention_mask: Array | None = None,
        segment_ids: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> tuple[Array, Array | None]:
        token_type_ids, attention_mask = _defaults(input_ids, token_type_ids, attention_mask)
        inputs = AttentionInputs(attention_mask, segment_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        x = self.encoder(x, inputs, deterministic)
        pooled = self.pooler(x, attention_mask) if self.add_pooling_layer else None
        return x, pooled


class _Transform(nn.Module):
    """cls/predictions/transform: dense -> gelu -> LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x = dense(cfg, cfg.hidden_size, ('embed', None), name='dense')(x)
        x = jax.nn.gelu(x, approximate=False)
        return norm(layer_norm(cfg, name='LayerNorm'), x, cfg.compute_dtype)


class BertPredictionHead(nn.Module):
    """cls/predictions: transform (dense -> gelu -> LayerNorm), tied decoder + output bias."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array, word_embeddings: Array) -> Array:
        cfg = self.config
        h = _Transform(cfg, name='transform')(hidden)
        bias = self.param(
            'bias',
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ('vocab',)),
            (cfg.vocab_size,),
            cfg.weights_dtype,
        )
        emb = word_embeddings.astype(cfg.compute_dtype)
        logits = jnp.einsum('bpe,ve->bpv', h, emb, preferred_element_type=jnp.float32)
        logits = logits + bias
        return nn.with_logical_constraint(logits, ('batch', None, 'vocab'))


class BertOnlyMLMHead(nn.Module):
    """The HF ``cls`` container; holds ``predictions``."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: Array, word_embeddings: Array) -> Array:
        return BertPredictionHead(self.config, name='predictions')(hidden, word_embeddings)


class BertForMaskedLM(nn.Module):
    """MLM logits (B, P, vocab) in float32, computed only at ``masked_positions`` (B, P).

    Positions must lie in [0, L): pad unused slots with 0 and mask them out of the loss.
    """

    config: BertConfig

    def setup(self) -> None:
        # mlm_pooler: the pooler is computed and its output dropped, so it has params (an
        # imported one is kept) and a zero gradient.
        self.bert = BertModel(self.config, add_pooling_layer=self.config.mlm_pooler)
        self.cls = BertOnlyMLMHead(self.config)

    def __call__(
        self,
        input_ids: Array,
        masked_positions: Array,
        token_type_ids: Array | None = None,
        attention_mask: Array | None = None,
        segment_ids: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        seq, _ = self.bert(
            input_ids, token_type_ids, attention_mask, segment_ids, deterministic=deterministic
        )
        # Gather first: the vocab projection only ever sees the P masked positions.
        hidden = jnp.take_along_axis(seq, masked_positions[..., None].astype(jnp.int32), axis=1)
        hidden = nn.with_logical_constraint(hidden, ('batch', None, 'embed'))
        table = self.bert.embeddings.word_embeddings.embedding
        return self.cls(hidden, table)


class BertForSequenceClassification(nn.Module):
    """Sequence classification logits (B, num_labels) in float32 from the pooled output."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        token_type_ids: Array | None = None,
        attention_mask: Array | None = None,
        segment_ids: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        cfg = self.config
        _, pooled = BertModel(cfg, add_pooling_layer=True, name='bert')(
            input_ids, token_type_ids, attention_mask, segment_ids, deterministic=deterministic
        )
        pooled = nn.Dropout(cfg.dropout_rate)(pooled, deterministic=deterministic)
        # The classifier keeps its bias even without use_bias: it is the label prior.
        logits = dense(cfg, cfg.num_labels, ('embed', None), name='classifier',
                       use_bias=True)(pooled)
        return logits.astype(jnp.float32)
