"""Our encoder with ModernBERT's options (rope, geglu, no bias, local/global attention, final
norm, pre-LN) against transformers' ModernBertModel (CPU torch) on mapped weights: the
groundwork for a ModernBERT export.

Two differences are bridged by the weights rather than the model: ModernBERT has no token-
type table (ours is zeroed) and its layer 0 has no attention norm (Identity); ours has one,
so the embedding norm and layer 0's attention norm are set to a unit scale, where a second
LayerNorm of an already normalised vector changes it only by O(eps)."""

import dataclasses

import numpy as np
import pytest

from models.bert import BertConfig, BertModel

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

H, HEADS, INTER, LAYERS, VOCAB, THETA = 32, 4, 48, 3, 97, 10000.0
OURS = BertConfig(vocab_size=VOCAB, hidden_size=H, num_layers=LAYERS, num_heads=HEADS,
                  intermediate_size=INTER, max_position_embeddings=64, dropout_rate=0.0,
                  attention_dropout_rate=0.0, layer_norm_eps=1e-12, pre_layer_norm=True,
                  position_embedding='rope', rope_theta=THETA, mlp='geglu', use_bias=False,
                  final_norm=True, local_attention_window=4, global_attention_every=2)


def _hf_model():
    config = transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTER, hidden_activation='gelu', max_position_embeddings=64,
        norm_eps=1e-12, norm_bias=False, attention_bias=False, mlp_bias=False,
        local_attention=4, global_attn_every_n_layers=2, global_rope_theta=THETA,
        local_rope_theta=THETA, attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        attn_implementation='eager')
    torch.manual_seed(0)
    model = transformers.ModernBertModel(config).eval()
    with torch.no_grad():  # larger-than-init weights so every term matters
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        model.embeddings.norm.weight.fill_(1.0)
    return config, model


def _our_params(hf) -> dict:
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    ones = np.ones(H, np.float32)
    layers = {}
    for i in range(LAYERS):
        pre = f'layers.{i}.'
        wqkv = sd[pre + 'attn.Wqkv.weight']  # (3H, H): rows q, then k, then v
        layers[f'layer_{i}'] = {
            'attention': {
                'self': {n: {'kernel': wqkv[c * H:(c + 1) * H].T}
                         for c, n in enumerate(('query', 'key', 'value'))},
                'output': {'dense': {'kernel': sd[pre + 'attn.Wo.weight'].T},
                           'LayerNorm': {'scale': sd.get(pre + 'attn_norm.weight', ones)}}},
            'intermediate': {'dense': {'kernel': sd[pre + 'mlp.Wi.weight'].T}},  # (H, 2I)
            'output': {'dense': {'kernel': sd[pre + 'mlp.Wo.weight'].T},
                       'LayerNorm': {'scale': sd[pre + 'mlp_norm.weight']}},
        }
    layers['final_layer_norm'] = {'scale': sd['final_norm.weight']}
    return {
        'embeddings': {
            'word_embeddings': {'embedding': sd['embeddings.tok_embeddings.weight']},
            'token_type_embeddings': {'embedding': np.zeros((2, H), np.float32)},
            'LayerNorm': {'scale': sd['embeddings.norm.weight']}},
        'encoder': layers,
    }


def test_matches_transformers_modernbert():
    config, hf = _hf_model()
    assert config.layer_types == ['full_attention', 'sliding_attention', 'full_attention']
    assert [OURS.is_global_layer(i) for i in range(LAYERS)] == [True, False, True]
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, (2, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 14:] = 0
    ids[1, 14:] = 0
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    ours, _ = BertModel(OURS).apply({'params': _our_params(hf)}, ids.astype(np.int32),
                                    None, mask.astype(np.int32))
    ours = np.asarray(ours)
    assert np.abs(theirs).max() > 0.5  # not a degenerate comparison
    real = mask.astype(bool)  # pad positions' outputs are unspecified on both sides
    np.testing.assert_allclose(ours[real], theirs[real], atol=2e-5, rtol=1e-5)
    # The window matters here: the same model without it differs.
    full = BertModel(dataclasses.replace(OURS, local_attention_window=0))
    no_window = np.asarray(full.apply({'params': _our_params(hf)}, ids.astype(np.int32),
                                      None, mask.astype(np.int32))[0])
    assert not np.allclose(no_window[real], theirs[real], atol=1e-3)
