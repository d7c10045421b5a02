"""Export of a modern-recipe MLM run to transformers' ModernBertForMaskedLM.

Which runs: pre-LN with a final norm and no attention norm in layer 0
(model.first_attention_norm=False), rotary positions, a gated MLP (geglu -> ModernBERT's
'gelu', swiglu -> 'silu'), and with or without biases and a sliding window. Anything else
is refused in one line naming what has no counterpart (`refusal`).

Mapping: q, k, v kernels concatenate into Wqkv; intermediate/output dense -> mlp.Wi / mlp.Wo;
attention and mlp LayerNorms -> attn_norm / mlp_norm (layer 0 has no attn_norm);
final_layer_norm -> final_norm; the MLM transform -> head.dense / head.norm; the tied
decoder keeps its bias. ModernBERT has no token-type table: row 0 of ours is added to every
input word embedding (the output decoder keeps ours, so the two are untied), which is exact
for single-segment inputs (token type 0), the way ModernBERT is used.
"""

from __future__ import annotations

import numpy as np

from models.bert import BertConfig

HIDDEN_ACTIVATIONS = {'geglu': 'gelu', 'swiglu': 'silu'}


def refusal(m: BertConfig, head: str) -> str | None:
    """Why this model has no ModernBertForMaskedLM counterpart, or None."""
    needs = [(head == 'mlm', 'a masked-LM run (the classification heads differ)'),
             (m.position_embedding == 'rope', 'model.position_embedding=rope'),
             (m.mlp in HIDDEN_ACTIVATIONS, 'model.mlp=geglu or swiglu'),
             (m.pre_layer_norm, 'model.pre_layer_norm=True'),
             (not m.first_attention_norm, 'model.first_attention_norm=False'),
             (m.local_attention_window % 2 == 0, 'an even model.local_attention_window')]
    missing = [what for ok, what in needs if not ok]
    return f'ModernBERT export needs {", ".join(missing)}' if missing else None


def hf_config(m: BertConfig, pad_id: int, cls_id: int, sep_id: int) -> dict:
    """transformers ModernBertConfig fields for our model."""
    window = m.local_attention_window
    return {
        'architectures': ['ModernBertForMaskedLM'], 'model_type': 'modernbert',
        'vocab_size': m.vocab_size, 'hidden_size': m.hidden_size,
        'num_hidden_layers': m.num_layers, 'num_attention_heads': m.num_heads,
        'intermediate_size': m.intermediate_size,
        'hidden_activation': HIDDEN_ACTIVATIONS[m.mlp], 'classifier_activation': 'gelu',
        'max_position_embeddings': m.max_position_embeddings, 'norm_eps': m.layer_norm_eps,
        'norm_bias': m.use_bias, 'attention_bias': m.use_bias, 'mlp_bias': m.use_bias,
        'classifier_bias': m.use_bias, 'decoder_bias': True,
        # No window: every layer global (the window value is then unused).
        'local_attention': window or 2, 'global_attn_every_n_layers':
            (m.global_attention_every if window else 1),
        'global_rope_theta': m.rope_theta, 'local_rope_theta': m.rope_theta,
        'embedding_dropout': m.dropout_rate, 'mlp_dropout': m.dropout_rate,
        'attention_dropout': m.attention_dropout_rate, 'initializer_range': m.initializer_range,
        'pad_token_id': pad_id, 'cls_token_id': cls_id, 'sep_token_id': sep_id,
        'bos_token_id': cls_id, 'eos_token_id': sep_id, 'tie_word_embeddings': False,
        'dtype': 'float32',
    }


def _dense(params: dict, out: dict, prefix: str) -> None:
    out[f'{prefix}.weight'] = np.asarray(params['kernel']).T
    if 'bias' in params:
        out[f'{prefix}.bias'] = np.asarray(params['bias'])


def _norm(params: dict, out: dict, prefix: str) -> None:
    out[f'{prefix}.weight'] = np.asarray(params['scale'])
    if 'bias' in params:
        out[f'{prefix}.bias'] = np.asarray(params['bias'])


def _layer(layer: dict, i: int, out: dict) -> None:
    pre = f'model.layers.{i}'
    attn = layer['attention']
    qkv = [attn['self'][n] for n in ('query', 'key', 'value')]
    out[f'{pre}.attn.Wqkv.weight'] = np.concatenate([np.asarray(p['kernel']).T for p in qkv])
    if 'bias' in qkv[0]:
        out[f'{pre}.attn.Wqkv.bias'] = np.concatenate([np.asarray(p['bias']) for p in qkv])
    _dense(attn['output']['dense'], out, f'{pre}.attn.Wo')
    if 'LayerNorm' in attn['output']:  # absent in layer 0
        _norm(attn['output']['LayerNorm'], out, f'{pre}.attn_norm')
    _dense(layer['intermediate']['dense'], out, f'{pre}.mlp.Wi')
    _dense(layer['output']['dense'], out, f'{pre}.mlp.Wo')
    _norm(layer['output']['LayerNorm'], out, f'{pre}.mlp_norm')


def to_hf(params: dict, m: BertConfig) -> dict[str, np.ndarray]:
    """Our MLM params (unrolled layers) -> ModernBertForMaskedLM's state dict (numpy)."""
    emb = params['bert']['embeddings']
    words = np.asarray(emb['word_embeddings']['embedding'])
    types = np.asarray(emb['token_type_embeddings']['embedding'])
    out = {'model.embeddings.tok_embeddings.weight': words + types[0]}
    _norm(emb['LayerNorm'], out, 'model.embeddings.norm')
    encoder = params['bert']['encoder']
    for i in range(m.num_layers):
        _layer(encoder[f'layer_{i}'], i, out)
    _norm(encoder['final_layer_norm'], out, 'model.final_norm')
    transform = params['cls']['predictions']['transform']
    _dense(transform['dense'], out, 'head.dense')
    _norm(transform['LayerNorm'], out, 'head.norm')
    out['decoder.weight'] = words  # untied: the input side carries the token-type row
    out['decoder.bias'] = np.asarray(params['cls']['predictions']['bias'])
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
