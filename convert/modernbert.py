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
for single-segment inputs (token type 0), the way ModernBERT is used; an all-zero row (an
imported ModernBERT's) leaves them tied, with no decoder weight written.

A classifier (classifier_head 'modernbert') exports to ModernBertForSequenceClassification:
the pooler's dense and LayerNorm are its head.dense / head.norm, classifier.* its classifier,
classifier_pooling our pooling (cls or mean).

Import (`from_hf`) is the inverse: Wqkv splits into q, k, v; tok_embeddings become the word
embeddings beside one all-zero token-type row; the decoder must be tied to them. A
ModernBertForSequenceClassification's head.* is kept as the pooler (model.mlm_pooler).
"""

from __future__ import annotations

import numpy as np

from engine.errors import ConfigError
from models.bert import BertConfig

HIDDEN_ACTIVATIONS = {'geglu': 'gelu', 'swiglu': 'silu'}


def refusal(m: BertConfig, head: str) -> str | None:
    """Why this model has no ModernBertForMaskedLM counterpart, or None."""
    needs = [(head in ('mlm', 'classifier'), 'a masked-LM or classifier run'),
             (m.position_embedding == 'rope', 'model.position_embedding=rope'),
             (m.mlp in HIDDEN_ACTIVATIONS, 'model.mlp=geglu or swiglu'),
             (m.pre_layer_norm, 'model.pre_layer_norm=True'),
             (not m.first_attention_norm, 'model.first_attention_norm=False'),
             (m.local_attention_window % 2 == 0, 'an even model.local_attention_window')]
    missing = [what for ok, what in needs if not ok]
    return f'ModernBERT export needs {", ".join(missing)}' if missing else None


def hf_config(m: BertConfig, pad_id: int, cls_id: int, sep_id: int, tied: bool = False
              ) -> dict:
    """transformers ModernBertConfig fields for our model (`tied`: to_hf wrote no decoder
    weight, as ModernBERT's own checkpoints)."""
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
        'global_rope_theta': m.rope_theta,
        'local_rope_theta': m.local_rope_theta or m.rope_theta,
        'embedding_dropout': m.dropout_rate, 'mlp_dropout': m.dropout_rate,
        'attention_dropout': m.attention_dropout_rate, 'initializer_range': m.initializer_range,
        'pad_token_id': pad_id, 'cls_token_id': cls_id, 'sep_token_id': sep_id,
        'bos_token_id': cls_id, 'eos_token_id': sep_id, 'tie_word_embeddings': tied,
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


def to_hf(params: dict, m: BertConfig, head: str = 'mlm') -> dict[str, np.ndarray]:
    """Our MLM params (unrolled layers) -> ModernBertForMaskedLM's state dict (numpy); a
    classifier's (`head` 'classifier', classifier_head 'modernbert': the pooler's dense and
    LayerNorm are its head) -> ModernBertForSequenceClassification's."""
    emb = params['bert']['embeddings']
    words = np.asarray(emb['word_embeddings']['embedding'])
    types = np.asarray(emb['token_type_embeddings']['embedding'])
    out = {'model.embeddings.tok_embeddings.weight': words + types[0]}
    _norm(emb['LayerNorm'], out, 'model.embeddings.norm')
    encoder = params['bert']['encoder']
    for i in range(m.num_layers):
        _layer(encoder[f'layer_{i}'], i, out)
    _norm(encoder['final_layer_norm'], out, 'model.final_norm')
    if head == 'classifier':
        pooler = params['bert']['pooler']
        _dense(pooler['dense'], out, 'head.dense')
        _norm(pooler['LayerNorm'], out, 'head.norm')
        _dense(params['classifier'], out, 'classifier')
        return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
    transform = params['cls']['predictions']['transform']
    _dense(transform['dense'], out, 'head.dense')
    _norm(transform['LayerNorm'], out, 'head.norm')
    if types[0].any():  # untied: the input side carries the token-type row
        out['decoder.weight'] = words
    out['decoder.bias'] = np.asarray(params['cls']['predictions']['bias'])
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------- import

ACTIVATIONS = {hf: ours for ours, hf in HIDDEN_ACTIVATIONS.items()}
# Keys a ModernBERT state dict may carry that hold nothing of ours.
IGNORED_KEYS = ('model.embeddings.position_ids',)


def _global_every(config: dict, layers: int) -> int:
    """Our global_attention_every from `layer_types` (transformers >= 5) or
    `global_attn_every_n_layers` (older configs, the hub's); a ConfigError for a pattern
    that is not 'layer i global when i % N == 0'."""
    types = config.get('layer_types')
    if types is None:
        every = config.get('global_attn_every_n_layers', 3)
        types = ['sliding_attention' if i % every else 'full_attention' for i in range(layers)]
    full = [i for i, t in enumerate(types) if t == 'full_attention']
    every = full[1] if len(full) > 1 else (0 if not full else layers)
    if len(types) != layers or [t == 'full_attention' for t in types] != [
            every > 0 and i % every == 0 for i in range(layers)]:
        raise ConfigError(f'--hf-dir: layer_types {types}: only "layer i global when i % N '
                          '== 0" has a counterpart here')
    return every


def _thetas(config: dict) -> tuple[float, float]:
    """(global, local) RoPE bases: rope_parameters (transformers >= 5) or the older
    global_rope_theta / local_rope_theta; only plain ('default') RoPE."""
    rope = config.get('rope_parameters') or {}
    out = []
    for kind, old, default in (('full_attention', 'global_rope_theta', 160000.0),
                               ('sliding_attention', 'local_rope_theta', 10000.0)):
        params = rope.get(kind) or {}
        if params.get('rope_type', 'default') != 'default':
            raise ConfigError(f"--hf-dir: rope_type {params['rope_type']!r}: only plain RoPE "
                              "('default') is supported")
        out.append(float(params.get('rope_theta', config.get(old, default))))
    return out[0], out[1]


def model_fields(config: dict) -> dict:
    """BertConfig fields of a transformers ModernBertConfig (config.json)."""
    act = config.get('hidden_activation', 'gelu')
    if act not in ACTIVATIONS:
        raise ConfigError(f'--hf-dir: hidden_activation {act!r}: only {sorted(ACTIVATIONS)} '
                          'are supported')
    if config.get('classifier_activation', 'gelu') != 'gelu':
        raise ConfigError(f"--hf-dir: classifier_activation {config['classifier_activation']!r}"
                          ": only 'gelu' is supported (the MLM head's)")
    biases = {k: bool(config.get(k, False)) for k in ('norm_bias', 'attention_bias',
                                                       'mlp_bias', 'classifier_bias')}
    if len(set(biases.values())) > 1:
        raise ConfigError(f'--hf-dir: {biases}: this model has one use_bias for all of them')
    try:
        layers = config['num_hidden_layers']
        every = _global_every(config, layers)
        window = config.get('local_attention', 128) // 2 * 2  # W and W+1 see +-W/2 alike
        global_theta, local_theta = _thetas(config)
        if every == 1:  # every layer global: no window
            window, every = 0, 3
        return {'vocab_size': config['vocab_size'], 'hidden_size': config['hidden_size'],
                'num_layers': layers, 'num_heads': config['num_attention_heads'],
                'intermediate_size': config['intermediate_size'],
                'max_position_embeddings': config.get('max_position_embeddings', 8192),
                'type_vocab_size': 1, 'position_embedding': 'rope',
                'classifier_head': 'modernbert',
                'rope_theta': global_theta,
                'local_rope_theta': 0.0 if local_theta == global_theta else local_theta,
                'mlp': ACTIVATIONS[act], 'use_bias': biases['norm_bias'],
                'pre_layer_norm': True, 'final_norm': True, 'first_attention_norm': False,
                'local_attention_window': window, 'global_attention_every': every,
                'dropout_rate': float(config.get('mlp_dropout', 0.0)),
                'attention_dropout_rate': float(config.get('attention_dropout', 0.0)),
                'layer_norm_eps': config.get('norm_eps', 1e-5),
                'initializer_range': config.get('initializer_range', 0.02)}
    except KeyError as e:
        raise ConfigError(f'--hf-dir: config.json has no {e.args[0]}') from None


def normalize_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A bare ModernBertModel's keys ('embeddings.*', 'layers.*', 'final_norm.*') under
    'model.' as ModernBertForMaskedLM has them."""
    top = ('model.', 'head.', 'decoder.', 'classifier.')  # classifier.*: has_head's sign
    return {k if k.startswith(top) else f'model.{k}': v for k, v in state.items()}


def has_head(state: dict) -> bool:
    """Whether the state dict holds an MLM head: head.* without a classifier (the head.* of a
    ModernBertForSequenceClassification feeds its classifier, not a decoder)."""
    return 'head.dense.weight' in state and not any(k.startswith('classifier.') for k in state)


def has_pooler(state: dict) -> bool:
    """Whether the state dict is a ModernBertForSequenceClassification's: its head.* (dense,
    GELU, norm) is the pooler of classifier_head 'modernbert', kept as model.mlm_pooler."""
    return 'head.dense.weight' in state and not has_head(state)


class _Reader:
    """Reads keys of a state dict as float32, remembering which it used."""

    def __init__(self, state: dict, bias: bool):
        self.state, self.bias, self.used = state, bias, set()

    def get(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise ConfigError(f'--hf-dir: the weights have no {key}')
        self.used.add(key)
        return np.asarray(self.state[key], np.float32)

    def dense(self, prefix: str) -> dict:
        out = {'kernel': np.ascontiguousarray(self.get(f'{prefix}.weight').T)}
        if self.bias:
            out['bias'] = self.get(f'{prefix}.bias')
        return out

    def norm(self, prefix: str) -> dict:
        out = {'scale': self.get(f'{prefix}.weight')}
        if self.bias:
            out['bias'] = self.get(f'{prefix}.bias')
        return out


def _read_layer(r: _Reader, i: int) -> dict:
    pre = f'model.layers.{i}'
    qkv = np.split(r.get(f'{pre}.attn.Wqkv.weight'), 3)  # rows q, then k, then v
    heads = {n: {'kernel': np.ascontiguousarray(w.T)}
             for n, w in zip(('query', 'key', 'value'), qkv, strict=True)}
    if r.bias:
        for n, b in zip(('query', 'key', 'value'), np.split(r.get(f'{pre}.attn.Wqkv.bias'), 3),
                        strict=True):
            heads[n]['bias'] = b
    output = {'dense': r.dense(f'{pre}.attn.Wo')}
    if i > 0:  # layer 0 has no attention norm (first_attention_norm=False)
        output['LayerNorm'] = r.norm(f'{pre}.attn_norm')
    return {'attention': {'self': heads, 'output': output},
            'intermediate': {'dense': r.dense(f'{pre}.mlp.Wi')},
            'output': {'dense': r.dense(f'{pre}.mlp.Wo'), 'LayerNorm': r.norm(f'{pre}.mlp_norm')}}


def from_hf(state: dict[str, np.ndarray], m: BertConfig, head: bool
            ) -> tuple[dict, set[str]]:
    """(our params, the keys used) of a ModernBERT state dict (normalize_keys'); `head`: the
    MLM head too. A decoder weight must be the tied one (tok_embeddings)."""
    r = _Reader(state, m.use_bias)
    words = r.get('model.embeddings.tok_embeddings.weight')
    encoder = {f'layer_{i}': _read_layer(r, i) for i in range(m.num_layers)}
    encoder['final_layer_norm'] = r.norm('model.final_norm')
    params = {'bert': {'embeddings': {
        'word_embeddings': {'embedding': words},
        'token_type_embeddings': {'embedding': np.zeros((1, m.hidden_size), np.float32)},
        'LayerNorm': r.norm('model.embeddings.norm')}, 'encoder': encoder}}
    if m.mlm_pooler:  # a classifier's head: the pooler
        params['bert']['pooler'] = {'dense': r.dense('head.dense'),
                                    'LayerNorm': r.norm('head.norm')}
    if head:
        if 'decoder.weight' in state and not np.array_equal(r.get('decoder.weight'), words):
            raise ConfigError('--hf-dir: decoder.weight differs from tok_embeddings (an untied '
                              'ModernBERT): this model ties its MLM decoder to the embeddings')
        bias = (r.get('decoder.bias') if 'decoder.bias' in state
                else np.zeros(m.vocab_size, np.float32))  # decoder_bias=False
        params['cls'] = {'predictions': {'bias': bias, 'transform': {
            'dense': r.dense('head.dense'), 'LayerNorm': r.norm('head.norm')}}}
    return params, r.used
