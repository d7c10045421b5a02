"""An embedding run (task=embedding) -> a sentence-transformers model directory.

The layout sentence-transformers saves and loads (SentenceTransformer(DIR)):
  modules.json                       [Transformer at '', Pooling at '1_Pooling']
  config.json, model.safetensors     a transformers BertModel (embeddings + encoder; no
                                     pooler: the embedding model has none, and Pooling
                                     reads the last hidden states)
  tokenizer files                    as `export` writes them (tokenizer.json, ...)
  sentence_bert_config.json          max_seq_length (the run's seq_len), do_lower_case
  config_sentence_transformers.json  cosine similarity
  1_Pooling/config.json              mean or [CLS] pooling, as the run pooled
The check loads the directory with transformers (BertModel), pools its last hidden states
as 1_Pooling says, and compares with this project's embeddings (VerificationError above
TOLERANCE).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np

from convert import names, verify
from models.config import BertConfig
from models.embedding import BertForSentenceEmbedding

TOLERANCE = 1e-4  # max |embedding difference| in float32
POOLING_DIR = '1_Pooling'
MODULES = [
    {'idx': 0, 'name': '0', 'path': '', 'type': 'sentence_transformers.models.Transformer'},
    {'idx': 1, 'name': '1', 'path': POOLING_DIR,
     'type': 'sentence_transformers.models.Pooling'},
]


def bert_model_tensors(params: dict, num_layers: int) -> dict[str, np.ndarray]:
    """Our {'bert': {embeddings, encoder}} -> transformers BertModel keys (no 'bert.')."""
    out = {}
    for path, hf, transpose in names.name_map(num_layers, 'mlm'):
        if path[0] != 'bert':
            continue  # the MLM head
        value = params
        for key in path:
            value = value[key]
        value = np.asarray(value, dtype=np.float32)
        out[hf[len('bert.'):]] = np.ascontiguousarray(value.T if transpose else value)
    return out


def pooling_config(pooling: str, hidden_size: int) -> dict:
    modes = ('cls_token', 'mean_tokens', 'max_tokens', 'mean_sqrt_len_tokens',
             'weightedmean_tokens', 'lasttoken')
    chosen = 'mean_tokens' if pooling == 'mean' else 'cls_token'
    return {'word_embedding_dimension': hidden_size,
            **{f'pooling_mode_{m}': m == chosen for m in modes}, 'include_prompt': True}


def write(out: pathlib.Path, model_cfg: BertConfig, params: dict, bert_config: dict,
          tokenizer, max_seq_length: int, check: bool) -> None:
    """Writes the directory (the tokenizer files are there already); `bert_config` is the
    transformers config.json of the encoder."""
    from safetensors.numpy import save_file
    save_file(bert_model_tensors(params, model_cfg.num_layers), str(out / 'model.safetensors'),
              metadata={'format': 'pt'})
    files = {
        names.HF_CONFIG_FILENAME: {**bert_config, 'architectures': ['BertModel']},
        'modules.json': MODULES,
        'sentence_bert_config.json': {'max_seq_length': max_seq_length,
                                      'do_lower_case': False},
        'config_sentence_transformers.json': {'prompts': {}, 'default_prompt_name': None,
                                              'similarity_fn_name': 'cosine'},
        f'{POOLING_DIR}/config.json': pooling_config(model_cfg.pooling, model_cfg.hidden_size),
    }
    (out / POOLING_DIR).mkdir()
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2) + '\n')
    if check:
        check_parity(out, model_cfg, params, tokenizer)


def hf_embeddings(directory: pathlib.Path, batch: dict) -> np.ndarray:
    """transformers BertModel's last hidden states, pooled as 1_Pooling/config.json says."""
    import torch
    import transformers
    model, info = transformers.AutoModel.from_pretrained(str(directory),
                                                         output_loading_info=True,
                                                         add_pooling_layer=False)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise verify.VerificationError(f'transformers reports {problems}')
    model.eval()
    with torch.no_grad():
        hidden = model(**{k: torch.as_tensor(v, dtype=torch.long)
                          for k, v in batch.items()}).last_hidden_state.float().numpy()
    pooling = json.loads((directory / POOLING_DIR / 'config.json').read_text())
    if pooling['pooling_mode_cls_token']:
        return hidden[:, 0]
    mask = batch['attention_mask'][..., None].astype(np.float32)
    return (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1.0)


def our_embeddings(model_cfg: BertConfig, params: dict, batch: dict) -> np.ndarray:
    cfg = dataclasses.replace(model_cfg, dtype='float32')
    return np.asarray(BertForSentenceEmbedding(cfg).apply(
        {'params': params}, jnp.asarray(batch['input_ids']),
        token_type_ids=jnp.asarray(batch['token_type_ids']),
        attention_mask=jnp.asarray(batch['attention_mask'])))


def check_parity(out: pathlib.Path, model_cfg: BertConfig, params: dict, tokenizer) -> None:
    """Prints the embedding difference; VerificationError above TOLERANCE."""
    if not verify.transformers_available():
        print('verify: skipped (transformers and torch are not installed)', flush=True)
        return
    import transformers
    transformers.logging.set_verbosity_error()
    batch = verify.fixed_batch(tokenizer, False, min(64, model_cfg.max_position_embeddings))
    diff = float(np.abs(our_embeddings(model_cfg, params, batch)
                        - hf_embeddings(out, batch)).max())
    print(f'max |embedding diff|: {diff:.3g} (transformers BertModel + pooling vs this '
          f'model, fp32, {len(batch["input_ids"])} padded sequences)', flush=True)
    matching, total = verify.tokenizer_parity(out, tokenizer)
    print(f'tokenizer: {matching}/{total} fixed inputs give the same ids', flush=True)
    if not diff <= TOLERANCE:  # also catches NaN
        raise verify.VerificationError(f'max |embedding diff| {diff:.3g} exceeds {TOLERANCE:g}')
