"""`BertConfig`: the one frozen dataclass every model module reads, and its validation.

The architecture options (issue 17) default to BERT, so a config without them builds
today's model bit for bit; `non_bert_options` names the ones a run moved away from BERT.

    position_embedding  'learned': a learned absolute table (BERT; caps the length at
                        max_position_embeddings). 'rope': rotary embeddings on q and k in
                        every attention layer (ModernBERT's rotate_half convention, theta
                        rope_theta), no position table and no length cap from one.
                        local_rope_theta > 0: the base of the local (windowed) layers
                        instead (ModernBERT's 10000 beside a global 160000); 0 = rope_theta.
    mlp                 'gelu': dense H->I, exact GELU, dense I->H (BERT). 'geglu' /
                        'swiglu': the up projection yields 2I features split as
                        `input, gate` (first half, second half, ModernBERT's Wi layout) and
                        the block computes act(input) * gate (act = exact GELU / SiLU).
    use_bias            False drops the bias of every Dense layer and LayerNorm in the
                        encoder, the pooler and the MLM transform; the MLM output bias (a
                        per-token prior) and the classifier's bias stay, as in ModernBERT,
                        and so do the PEFT adapters' (models/peft.py).
    final_norm          True adds a LayerNorm after the last layer (pre-LN always has one).
    local_attention_window, global_attention_every
                        window W > 0: token i attends to keys j with |i - j| <= W // 2
                        (ModernBERT's local_attention), except in global layers: layer l is
                        global when l % global_attention_every == 0 (0: no global layer).
    attention_impl      the scaled dot-product kernel: 'auto' (explicit with attention
                        dropout in training, else xla on CPU, cuDNN on GPU for 16-bit,
                        splash on TPU; models/attention.py), or 'explicit', 'xla', 'cudnn',
                        'splash' (these three have no dropout: attention_dropout_rate 0).
    position_offset     learned positions: token i reads row i + position_offset of the table
                        (RoBERTa's padding_idx + 1 = 2; BERT 0), so sequences are at most
                        max_position_embeddings - position_offset long.
    type_vocab_size     1: no token types (RoBERTa); every token reads row 0 (a pair's
                        second-segment types are ignored, not clamped by the lookup).
    export_as           '' (export by architecture: BERT, RoBERTa, ModernBERT) or 'distilbert':
                        an imported DistilBERT, a BERT with one all-zero token-type row
                        (type_vocab_size 1) that export folds into the position table.
    mlm_pooler          True: the MLM model also holds a pooler (dense + tanh on [CLS]) that
                        its loss never trains (only weight decay reaches it): an imported
                        checkpoint's pretrained pooler, kept for fine-tuning (pooling='cls')
                        and export.
    pooling             sequence classification: 'cls' pools [CLS] (BERT), 'mean' the
                        masked mean of the non-pad tokens; both then go through the pooler
                        dense + tanh.
    classifier_head     the pooler's shape after its dense layer: 'bert' tanh (BERT, RoBERTa),
                        'modernbert' exact GELU then a LayerNorm (ModernBertPredictionHead),
                        'distilbert' ReLU (DistilBERT's pre_classifier); `import` sets its
                        family's, fine-tuning takes init_from's unless it names one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

DTYPES = ('float32', 'bfloat16')
# How a run computes, not what its weights are: each stage's own config sets these, whatever
# the run it starts from used (continued pretraining, fine-tuning).
RUNTIME_FIELDS = ('dropout_rate', 'attention_dropout_rate', 'dtype', 'remat')
REMAT_POLICIES = {
    'none': None,
    'full': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
POSITION_EMBEDDINGS = ('learned', 'rope')
MLPS = ('gelu', 'geglu', 'swiglu')
POOLINGS = ('cls', 'mean')
ATTENTION_IMPLS = ('auto', 'explicit', 'xla', 'cudnn', 'splash')
ADAPTER_PLACEMENTS = ('houlsby', 'pfeiffer')  # models/peft.py
EXPORT_FAMILIES = ('', 'distilbert')
CLASSIFIER_HEADS = ('bert', 'modernbert', 'distilbert')


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
    dtype: str = 'float32'  # compute dtype
    # The parameters' dtype (what a checkpoint stores): bfloat16 halves their memory, but
    # Adam's small updates then round away (docs/throughput.md, Precision); PEFT's added
    # parameters stay float32.
    param_dtype: str = 'float32'
    initializer_range: float = 0.02  # truncated-normal std as in BERT
    remat: str = 'none'  # 'none' | 'full' | 'dots'
    num_labels: int = 2  # only for the classification head
    # Architecture options (module docstring); the defaults are BERT.
    position_embedding: str = 'learned'  # 'learned' | 'rope'
    rope_theta: float = 10000.0  # RoPE base; only with position_embedding='rope'
    local_rope_theta: float = 0.0  # RoPE base of the local layers; 0 = rope_theta
    mlp: str = 'gelu'  # 'gelu' | 'geglu' | 'swiglu'
    use_bias: bool = True  # False: bias-free Dense layers and LayerNorms
    final_norm: bool = False  # a LayerNorm after the last layer (implied by pre_layer_norm)
    local_attention_window: int = 0  # 0 = off; W: attend within +-W/2 in local layers
    global_attention_every: int = 3  # layer l is global when l % N == 0; 0 = none global
    pooling: str = 'cls'  # sequence classification: 'cls' | 'mean'
    classifier_head: str = 'bert'  # CLASSIFIER_HEADS: the pooler's activation (and norm)
    position_offset: int = 0  # first position row (RoBERTa: padding_idx + 1)
    mlm_pooler: bool = False  # the MLM model keeps a (pretrained, untrained) pooler
    export_as: str = ''  # EXPORT_FAMILIES: '' by architecture, 'distilbert'
    attention_impl: str = 'auto'  # ATTENTION_IMPLS; resolved per platform (models/attention.py)
    scan_layers: bool = False  # one nn.scan over the layers (stacked params; models/scan.py)
    # Pre-LN only: False = layer 0 has no attention LayerNorm, the embedding norm plays its
    # part (ModernBERT's layout, needed for its export).
    first_attention_norm: bool = True
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
        _validate_peft(self)
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f'hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}'
            )
        if self.dtype not in DTYPES:
            raise ValueError(f'dtype must be one of {DTYPES}, got {self.dtype!r}')
        if self.param_dtype not in DTYPES:
            raise ValueError(f'param_dtype must be one of {DTYPES}, got {self.param_dtype!r}')
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f'remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}')
        for name in ('dropout_rate', 'attention_dropout_rate'):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f'{name} must be in [0, 1), got {rate}')
        _validate_architecture(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def gated_mlp(self) -> bool:
        return self.mlp != 'gelu'

    def is_global_layer(self, layer: int) -> bool:
        """Whether `layer` attends over the whole sequence (always, without a window)."""
        if not self.local_attention_window:
            return True
        every = self.global_attention_every
        return every > 0 and layer % every == 0


def model_config(fields: Mapping[str, Any]) -> BertConfig:
    """The model's config from its fields (a config's `model` section, a saved model.json, an
    imported checkpoint's): the one place a BertConfig is made from data. Unknown fields and
    bad values raise ValueError naming them."""
    known = {f.name for f in dataclasses.fields(BertConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f'unknown field(s) {", ".join(unknown)}')
    return BertConfig(**fields)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')


def _validate_peft(c: BertConfig) -> None:
    """The PEFT fields (models/peft.py): each a one-line ValueError."""
    if c.lora_rank < 0 or c.adapter_size < 0 or c.prefix_length < 0:
        raise ValueError('lora_rank, adapter_size and prefix_length must be >= 0')
    if c.lora_alpha < 0:
        raise ValueError(f'lora_alpha must be >= 0, got {c.lora_alpha}')
    _one_of('adapter_placement', c.adapter_placement, ADAPTER_PLACEMENTS)
    if c.lora_rank and not c.lora_targets:
        raise ValueError('lora_rank > 0 needs lora_targets')
    for target in c.lora_targets:  # an alias of peft.TARGET_ALIASES is a plain word
        try:
            re.compile(target)
        except re.error as e:
            raise ValueError(f'lora_targets: bad regex {target!r}: {e}') from None


def _validate_architecture(c: BertConfig) -> None:
    """The architecture options: each a one-line ValueError naming the field."""
    _one_of('position_embedding', c.position_embedding, POSITION_EMBEDDINGS)
    _one_of('mlp', c.mlp, MLPS)
    _one_of('pooling', c.pooling, POOLINGS)
    _one_of('attention_impl', c.attention_impl, ATTENTION_IMPLS)
    _one_of('export_as', c.export_as, EXPORT_FAMILIES)
    _one_of('classifier_head', c.classifier_head, CLASSIFIER_HEADS)
    if c.export_as == 'distilbert' and c.type_vocab_size != 1:
        raise ValueError('export_as=distilbert needs type_vocab_size=1 (DistilBERT has no '
                         'token types)')
    if c.attention_impl in ('xla', 'cudnn', 'splash') and c.attention_dropout_rate > 0:
        raise ValueError(f'attention_impl={c.attention_impl} has no attention dropout; set '
                         'attention_dropout_rate=0 or attention_impl=auto')
    if c.position_embedding == 'rope':
        # rotate_half pairs dimension d with d + head_dim/2.
        if c.head_dim % 2:
            raise ValueError(f'position_embedding=rope needs an even head_dim, got '
                             f'{c.head_dim} (hidden_size {c.hidden_size} / {c.num_heads} heads)')
        if not c.rope_theta > 0:
            raise ValueError(f'rope_theta must be > 0, got {c.rope_theta}')
    if not c.local_rope_theta >= 0:
        raise ValueError(f'local_rope_theta must be >= 0 (0: rope_theta), got '
                         f'{c.local_rope_theta}')
    if not c.first_attention_norm and (not c.pre_layer_norm or c.scan_layers):
        raise ValueError('first_attention_norm=False needs pre_layer_norm=True and '
                         'scan_layers=False (layer 0 then differs from the others)')
    if c.scan_layers and (c.lora_rank or c.adapter_size or c.prefix_length):
        raise ValueError('scan_layers: PEFT needs per-layer parameters; fine-tuning unrolls '
                         'the layers of a scanned run (leave scan_layers off)')
    if c.position_offset < 0 or c.position_offset >= c.max_position_embeddings:
        raise ValueError(f'position_offset must be in [0, max_position_embeddings), got '
                         f'{c.position_offset}')
    if c.type_vocab_size < 1:
        raise ValueError(f'type_vocab_size must be >= 1, got {c.type_vocab_size}')
    window, every = c.local_attention_window, c.global_attention_every
    if window < 0 or window % 2:
        raise ValueError(f'local_attention_window must be 0 (off) or an even number of tokens '
                         f'> 0 (each token sees +-window/2), got {window}')
    if every < 0:
        raise ValueError(f'global_attention_every must be >= 0 (0: no global layer), got {every}')
    if window and every == 1:
        raise ValueError('local_attention_window has no effect with global_attention_every=1 '
                         '(every layer global); use 0 or N > 1')


# field -> its BERT value; what `non_bert_options` checks.
BERT_DEFAULTS = {
    'position_embedding': 'learned',
    'mlp': 'gelu',
    'use_bias': True,
    'final_norm': False,
    'local_attention_window': 0,
    'pooling': 'cls',
    'first_attention_norm': True,
}


def non_bert_options(config: BertConfig) -> list[str]:
    """'field=value' for each architecture option set away from BERT (empty: plain BERT)."""
    return [f'{name}={getattr(config, name)!r}' for name, bert in BERT_DEFAULTS.items()
            if getattr(config, name) != bert]
