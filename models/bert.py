"""Pure-functional flax.linen BERT encoder with MLM and sequence-classification heads.

The parameter tree mirrors Hugging Face ``BertForMaskedLM`` / ``BertForSequenceClassification``
module names one-to-one so that an exporter only has to rename leaves and transpose kernels.
Every parameter and the main activations carry logical axis names drawn from
``batch, length, embed, mlp, heads, kv, vocab``; without a mesh / rules they are no-ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import peft

Array = jax.Array
LogicalAxes = Sequence[str | None]

_DTYPES = ('float32', 'bfloat16')
_REMAT_POLICIES = {
    'none': None,
    'full': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 8000
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout_rate: float = 0.1  # hidden dropout
    attention_dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    pre_layer_norm: bool = False  # post-LN (BERT) by default; pre-LN adds a final LayerNorm
    dtype: str = 'float32'  # compute dtype; params are always float32
    initializer_range: float = 0.02  # truncated-normal std as in BERT
    remat: str = 'none'  # 'none' | 'full' | 'dots'
    num_labels: int = 2  # only for the classification head
    # Parameter-efficient fine-tuning (models/peft.py); off by default, adding no params.
    lora_rank: int = 0  # > 0: LoRA of this rank on the encoder Dense layers lora_targets match
    lora_alpha: float = 0.0  # LoRA scale = alpha / rank; 0 means alpha = rank
    lora_targets: tuple[str, ...] = ()  # peft.TARGET_ALIASES names or module-path regexes
    adapter_size: int = 0  # > 0: bottleneck adapters of this width
    adapter_placement: str = 'houlsby'  # after attention and FFN; 'pfeiffer': FFN only
    prefix_length: int = 0  # > 0: prefix tuning, this many learned keys/values per layer

    def __post_init__(self) -> None:
        # A tuple (hashable) even when read back from JSON as a list.
        object.__setattr__(self, 'lora_targets', tuple(self.lora_targets))
        peft.validate_config(self)
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f'hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}'
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f'dtype must be one of {_DTYPES}, got {self.dtype!r}')
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(f'remat must be one of {tuple(_REMAT_POLICIES)}, got {self.remat!r}')
        for name in ('dropout_rate', 'attention_dropout_rate'):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f'{name} must be in [0, 1), got {rate}')

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


# ----------------------------------------------------------------------------- building blocks


def _kernel_init(config: BertConfig, axes: LogicalAxes) -> nn.initializers.Initializer:
    # Truncated at +-2 std like the original TF BERT initializer.
    init = nn.initializers.truncated_normal(stddev=config.initializer_range)
    return nn.with_logical_partitioning(init, tuple(axes))


def _dense(
    config: BertConfig, features: int, kernel_axes: LogicalAxes, name: str | None = None
) -> nn.Dense:
    """Dense layer: compute in config dtype, float32 params, zero bias named like the output."""
    kwargs = dict(
        dtype=config.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=_kernel_init(config, kernel_axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (kernel_axes[1],)),
        name=name,
    )
    if config.lora_rank:  # same params and maths, plus LoRA where lora_targets match its path
        return peft.LoraDense(features, config=config, kernel_axes=tuple(kernel_axes), **kwargs)
    return nn.Dense(features, **kwargs)


def _embed(config: BertConfig, num: int, axes: LogicalAxes, name: str | None = None) -> nn.Embed:
    return nn.Embed(
        num,
        config.hidden_size,
        dtype=config.compute_dtype,
        param_dtype=jnp.float32,
        embedding_init=_kernel_init(config, axes),
        name=name,
    )


def _layer_norm(config: BertConfig, name: str | None = None) -> nn.LayerNorm:
    """A float32 LayerNorm with logical names; callers cast the result to the compute dtype."""
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
        name=name,
    )


def _norm(ln: nn.LayerNorm, x: Array, dtype: jnp.dtype) -> Array:
    # Statistics in float32 for stability even when computing in bfloat16.
    return ln(x.astype(jnp.float32)).astype(dtype)


def _hidden_constraint(x: Array) -> Array:
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


def make_attention_mask(attention_mask: Array, segment_ids: Array | None = None) -> Array:
    """Boolean (B, 1, L, L) mask: keys must be real tokens (and in the query's segment)."""
    keys = attention_mask.astype(bool)[:, None, None, :]
    if segment_ids is None:
        length = attention_mask.shape[-1]
        return jnp.broadcast_to(keys, (*attention_mask.shape[:-1], 1, length, length))
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return jnp.logical_and(same, keys)


# ----------------------------------------------------------------------------- embeddings


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings -> LayerNorm -> dropout."""

    config: BertConfig

    def setup(self) -> None:
        cfg = self.config
        self.word_embeddings = _embed(cfg, cfg.vocab_size, ('vocab', 'embed'))
        self.position_embeddings = _embed(cfg, cfg.max_position_embeddings, (None, 'embed'))
        self.token_type_embeddings = _embed(cfg, cfg.type_vocab_size, (None, 'embed'))
        self.LayerNorm = _layer_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            # jnp indexing would silently clamp the out-of-range position ids.
            raise ValueError(
                f'sequence length {length} > max_position_embeddings '
                f'{self.config.max_position_embeddings}'
            )
        positions = jnp.arange(length)[None, :]
        # Sum in float32: it feeds a float32 LayerNorm anyway.
        x = (
            self.word_embeddings(input_ids).astype(jnp.float32)
            + self.position_embeddings(positions).astype(jnp.float32)
            + self.token_type_embeddings(token_type_ids).astype(jnp.float32)
        )
        x = _norm(self.LayerNorm, x, self.config.compute_dtype)
        x = self.dropout(x, deterministic=deterministic)
        return _hidden_constraint(x)


# ----------------------------------------------------------------------------- attention


class BertSelfAttention(nn.Module):
    """Multi-head self-attention: q/k/v projections + scaled dot-product (no output proj)."""

    config: BertConfig

    def _split_heads(self, x: Array) -> Array:
        cfg = self.config
        x = x.reshape(*x.shape[:-1], cfg.num_heads, cfg.head_dim)
        return nn.with_logical_constraint(x, ('batch', 'length', 'heads', 'kv'))

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        q, k, v = (
            self._split_heads(_dense(cfg, cfg.hidden_size, ('embed', 'heads'), name=n)(x))
            for n in ('query', 'key', 'value')
        )
        if cfg.prefix_length:
            k, v, mask = peft.Prefix(cfg, name=peft.PREFIX_NAME)(k, v, mask)
        if not deterministic and cfg.attention_dropout_rate > 0.0:
            drop = nn.Dropout(cfg.attention_dropout_rate, name='attention_dropout')
            out = explicit_attention(q, k, v, mask, lambda p: drop(p, deterministic=False))
        else:
            out = fused_attention(q, k, v, mask)
        out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'kv'))
        return out.reshape(*out.shape[:-2], cfg.hidden_size)


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


class _DenseNorm(nn.Module):
    """HF's ``*Output`` module: a 'dense' projection and a 'LayerNorm' (used pre or post)."""

    config: BertConfig
    kernel_axes: tuple[str, str]

    def setup(self) -> None:
        self.dense = _dense(self.config, self.config.hidden_size, self.kernel_axes)
        self.LayerNorm = _layer_norm(self.config)
        self.dropout = nn.Dropout(self.config.dropout_rate)
        # The feed-forward output projects from 'mlp'; the attention output from 'heads'.
        self.adapted = peft.wants_adapter(self.config, ffn=self.kernel_axes[0] == 'mlp')
        if self.adapted:
            self.adapter = peft.Adapter(self.config)

    def project(self, x: Array, deterministic: bool) -> Array:
        h = self.dropout(self.dense(x), deterministic=deterministic)
        return self.adapter(h) if self.adapted else h

    def norm(self, x: Array) -> Array:
        return _norm(self.LayerNorm, x, self.config.compute_dtype)


def _residual(
    out: _DenseNorm, branch: Callable[[Array], Array], x: Array, pre_ln: bool, deterministic: bool
) -> Array:
    """Post-LN: LN(x + drop(f(x))).  Pre-LN: x + drop(f(LN(x)))."""
    if pre_ln:
        return x + out.project(branch(out.norm(x)), deterministic)
    return out.norm(x + out.project(branch(x), deterministic))


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        attn = BertSelfAttention(self.config, name='self')
        out = _DenseNorm(self.config, ('heads', 'embed'), name='output')

        def branch(h: Array) -> Array:
            return attn(h, mask, deterministic)

        return _residual(out, branch, x, self.config.pre_layer_norm, deterministic)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = _dense(cfg, cfg.intermediate_size, ('embed', 'mlp'), name='dense')(x)
        h = jax.nn.gelu(h, approximate=False)  # exact erf GELU, as HF hidden_act='gelu'
        return nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))


class BertLayer(nn.Module):
    """One transformer block (post-LN as in BERT, or pre-LN)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        x = BertAttention(cfg, name='attention')(x, mask, deterministic)
        x = _hidden_constraint(x)
        intermediate = BertIntermediate(cfg, name='intermediate')
        out = _DenseNorm(cfg, ('mlp', 'embed'), name='output')
        x = _residual(out, intermediate, x, cfg.pre_layer_norm, deterministic)
        return _hidden_constraint(x)


def _layer_class(config: BertConfig) -> type[nn.Module]:
    if config.remat == 'none':
        return BertLayer
    # self=0, x=1, mask=2, deterministic=3: `deterministic` drives Python control flow.
    return nn.remat(BertLayer, static_argnums=(3,), policy=_REMAT_POLICIES[config.remat])


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        layer_cls = _layer_class(cfg)
        # Separate named layers (no scan) keep the tree one-to-one with HF's encoder.layer.{i}.
        for i in range(cfg.num_layers):
            x = layer_cls(cfg, name=f'layer_{i}')(x, mask, deterministic)
        if cfg.pre_layer_norm:
            x = _norm(_layer_norm(cfg, name='final_layer_norm'), x, cfg.compute_dtype)
            x = _hidden_constraint(x)
        return x


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, sequence_output: Array) -> Array:
        cfg = self.config
        first = sequence_output[:, 0]
        return jnp.tanh(_dense(cfg, cfg.hidden_size, ('embed', None), name='dense')(first))


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
        mask = make_attention_mask(attention_mask, segment_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        x = self.encoder(x, mask, deterministic)
        pooled = self.pooler(x) if self.add_pooling_layer else None
        return x, pooled


class _Transform(nn.Module):
    """cls/predictions/transform: dense -> gelu -> LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, ('embed', None), name='dense')(x)
        x = jax.nn.gelu(x, approximate=False)
        return _norm(_layer_norm(cfg, name='LayerNorm'), x, cfg.compute_dtype)


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
            jnp.float32,
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
        self.bert = BertModel(self.config, add_pooling_layer=False)
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
        logits = _dense(cfg, cfg.num_labels, ('embed', None), name='classifier')(pooled)
        return logits.astype(jnp.float32)
