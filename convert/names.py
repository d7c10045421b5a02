"""The one name map between this project's parameter tree and a transformers BERT state dict.

Our tree (models/bert.py) already uses Hugging Face module names, so each entry is a rename
of the leaf (Dense 'kernel' -> 'weight' transposed, LayerNorm 'scale' -> 'weight', Embed
'embedding' -> 'weight') plus the path spelled with dots and `layer.{i}` for `layer_{i}`.

Heads:
  'mlm'         BertForMaskedLM: `cls.predictions.{bias,transform.*}`; the decoder is tied to
                the word embeddings, so transformers saves neither `decoder.weight` nor
                `decoder.bias` (an alias of `cls.predictions.bias`).
  'classifier'  BertForSequenceClassification: `bert.pooler.dense.*` and `classifier.*`.
  'token_classifier'  BertForTokenClassification: `classifier.*` on every token, no pooler.
  'qa'          BertForQuestionAnswering: `qa_outputs.*` (start, end), no pooler.
  'electra'     ElectraForPreTraining (the discriminator): `discriminator_predictions.
                {dense,dense_prediction}.*`, our models/electra.py head of the same names.
An MLM model with `mlm_pooler` (a kept pretrained pooler) also maps `bert.pooler.dense.*`.

RoBERTa (`roberta.*`, `lm_head.{dense,layer_norm,bias}`) is the same tree under other
names: `normalize_hf_keys` renames it to BERT's on import, `roberta_names` back on export.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

Path = tuple[str, ...]
HF_CONFIG_FILENAME = 'config.json'  # transformers' model config (not our workdir's)
HEADS = ('mlm', 'classifier', 'electra', 'token_classifier', 'qa')
# Keys older or other transformers BERT checkpoints carry that hold nothing we need: the
# tied decoder copies, the position-id buffer, next-sentence prediction.
IGNORED_HF_KEYS = ('cls.predictions.decoder.weight', 'cls.predictions.decoder.bias',
                   'bert.embeddings.position_ids', 'bert.embeddings.token_type_ids',
                   'cls.seq_relationship.weight', 'cls.seq_relationship.bias')
POOLER_KEYS = ('bert.pooler.dense.weight', 'bert.pooler.dense.bias')
# (RoBERTa prefix, BERT prefix): a key starting with the one starts with the other.
ROBERTA_PREFIXES = (('roberta.', 'bert.'),
                    ('lm_head.dense.', 'cls.predictions.transform.dense.'),
                    ('lm_head.layer_norm.', 'cls.predictions.transform.LayerNorm.'),
                    ('lm_head.decoder.', 'cls.predictions.decoder.'),
                    ('lm_head.bias', 'cls.predictions.bias'))
ELECTRA_PREFIXES = (('electra.', 'bert.'),)
# DistilBERT's names of BERT's modules (its layer i's, then its MLM head's).
DISTILBERT_LAYER = (('attention.q_lin', 'attention.self.query'),
                    ('attention.k_lin', 'attention.self.key'),
                    ('attention.v_lin', 'attention.self.value'),
                    ('attention.out_lin', 'attention.output.dense'),
                    ('sa_layer_norm', 'attention.output.LayerNorm'),
                    ('ffn.lin1', 'intermediate.dense'), ('ffn.lin2', 'output.dense'),
                    ('output_layer_norm', 'output.LayerNorm'))
DISTILBERT_HEAD = (('vocab_transform.', 'cls.predictions.transform.dense.'),
                   ('vocab_layer_norm.', 'cls.predictions.transform.LayerNorm.'),
                   ('vocab_projector.bias', 'cls.predictions.bias'),
                   ('vocab_projector.weight', 'cls.predictions.decoder.weight'),
                   # DistilBertForSequenceClassification's pre_classifier is our pooler
                   ('pre_classifier.', 'bert.pooler.dense.'))
_DISTIL_LAYER = re.compile(r'^(?:distilbert\.)?transformer\.layer\.(\d+)\.(.+)$')


def _dense(ours: Path, hf: str) -> Iterator[tuple[Path, str, bool]]:
    yield (*ours, 'kernel'), f'{hf}.weight', True  # flax (in, out) vs torch (out, in)
    yield (*ours, 'bias'), f'{hf}.bias', False


def _norm(ours: Path, hf: str) -> Iterator[tuple[Path, str, bool]]:
    yield (*ours, 'scale'), f'{hf}.weight', False
    yield (*ours, 'bias'), f'{hf}.bias', False


def _embeddings() -> Iterator[tuple[Path, str, bool]]:
    for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings'):
        yield ('bert', 'embeddings', name, 'embedding'), f'bert.embeddings.{name}.weight', False
    yield from _norm(('bert', 'embeddings', 'LayerNorm'), 'bert.embeddings.LayerNorm')


def _layer(i: int) -> Iterator[tuple[Path, str, bool]]:
    ours, hf = ('bert', 'encoder', f'layer_{i}'), f'bert.encoder.layer.{i}'
    for name in ('query', 'key', 'value'):
        yield from _dense((*ours, 'attention', 'self', name), f'{hf}.attention.self.{name}')
    yield from _dense((*ours, 'attention', 'output', 'dense'), f'{hf}.attention.output.dense')
    yield from _norm((*ours, 'attention', 'output', 'LayerNorm'),
                     f'{hf}.attention.output.LayerNorm')
    yield from _dense((*ours, 'intermediate', 'dense'), f'{hf}.intermediate.dense')
    yield from _dense((*ours, 'output', 'dense'), f'{hf}.output.dense')
    yield from _norm((*ours, 'output', 'LayerNorm'), f'{hf}.output.LayerNorm')


def _mlm_head() -> Iterator[tuple[Path, str, bool]]:
    yield ('cls', 'predictions', 'bias'), 'cls.predictions.bias', False
    yield from _dense(('cls', 'predictions', 'transform', 'dense'),
                      'cls.predictions.transform.dense')
    yield from _norm(('cls', 'predictions', 'transform', 'LayerNorm'),
                     'cls.predictions.transform.LayerNorm')


def _classifier_head() -> Iterator[tuple[Path, str, bool]]:
    yield from _dense(('bert', 'pooler', 'dense'), 'bert.pooler.dense')
    yield from _dense(('classifier',), 'classifier')


def _discriminator_head() -> Iterator[tuple[Path, str, bool]]:
    for name in ('dense', 'dense_prediction'):
        yield from _dense(('discriminator_predictions', name), f'discriminator_predictions.{name}')


def _head(head: str) -> Iterator[tuple[Path, str, bool]]:
    return {'mlm': _mlm_head, 'classifier': _classifier_head,
            'electra': _discriminator_head,
            'token_classifier': lambda: _dense(('classifier',), 'classifier'),
            'qa': lambda: _dense(('qa_outputs',), 'qa_outputs')}[head]()


def name_map(num_layers: int, head: str, pooler: bool = False
             ) -> list[tuple[Path, str, bool]]:
    """[(our path, transformers key, transpose?)] for every parameter of the model;
    `pooler`: an MLM model's kept pooler too (a classifier always has one)."""
    if head not in HEADS:
        raise ValueError(f'head must be one of {HEADS}, got {head!r}')
    entries = list(_embeddings())
    for i in range(num_layers):
        entries += list(_layer(i))
    entries += list(_head(head))
    if pooler and head == 'mlm':
        entries += list(_dense(('bert', 'pooler', 'dense'), 'bert.pooler.dense'))
    return entries


def encoder_keys(num_layers: int) -> set[str]:
    """The transformers keys of embeddings + encoder (what every BERT checkpoint has)."""
    return {hf for path, hf, _ in name_map(num_layers, 'mlm') if path[0] == 'bert'}


def head_keys(num_layers: int, head: str) -> set[str]:
    return {hf for _, hf, _ in name_map(num_layers, head)} - encoder_keys(num_layers)


def _get(tree: dict, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def to_hf(params: dict, num_layers: int, head: str) -> dict[str, np.ndarray]:
    """Our nested params -> {transformers key: float32 array}; every leaf must be mapped."""
    out = {}
    pooler = 'pooler' in params.get('bert', {})
    for path, hf, transpose in name_map(num_layers, head, pooler):
        value = np.asarray(_get(params, path), dtype=np.float32)
        out[hf] = np.ascontiguousarray(value.T if transpose else value)
    mapped = len(out)
    total = len(_leaves(params))
    if mapped != total:
        raise ValueError(f'{total - mapped} parameters have no transformers name '
                         '(pre-LN models have no BERT counterpart)')
    return out


def from_hf(state: dict[str, np.ndarray], num_layers: int, head: str,
            keys: set[str] | None = None, pooler: bool = False) -> dict:
    """{transformers key: array} -> our nested params (only `keys` if given, else all)."""
    params: dict = {}
    for path, hf, transpose in name_map(num_layers, head, pooler):
        if keys is not None and hf not in keys:
            continue
        if hf not in state:
            raise KeyError(hf)
        value = np.asarray(state[hf], dtype=np.float32)
        _set(params, path, np.ascontiguousarray(value.T if transpose else value))
    return params


def normalize_hf_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Spellings of other BERT checkpoints -> ours: a bare BertModel ('embeddings.*' without
    'bert.'), TF-era LayerNorm 'gamma'/'beta'."""
    out = {}
    for key, value in state.items():
        key = _renamed(key, ROBERTA_PREFIXES + ELECTRA_PREFIXES)
        if key.startswith(('embeddings.', 'encoder.', 'pooler.')):
            key = f'bert.{key}'
        if key.endswith('LayerNorm.gamma'):
            key = key[:-len('gamma')] + 'weight'
        elif key.endswith('LayerNorm.beta'):
            key = key[:-len('beta')] + 'bias'
        out[key] = value
    return out


def _renamed(key: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def roberta_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BERT-named tensors (to_hf's) -> RobertaForMaskedLM's names."""
    back = tuple((bert, roberta) for roberta, bert in ROBERTA_PREFIXES)
    return {_renamed(key, back): value for key, value in tensors.items()}


def _from_distil(key: str) -> str:
    layer = _DISTIL_LAYER.match(key)
    if layer:
        i, rest = layer.groups()
        for distil, bert in DISTILBERT_LAYER:
            if rest.startswith(distil + '.'):
                return f'bert.encoder.layer.{i}.{bert}{rest[len(distil):]}'
    if key.startswith(('distilbert.embeddings.', 'embeddings.')):
        return 'bert.' + key.removeprefix('distilbert.')
    return _renamed(key, DISTILBERT_HEAD)


def from_distilbert(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A DistilBERT state dict in BERT's names, with the one all-zero token-type row our
    embeddings add (DistilBERT has none)."""
    out = {_from_distil(key): value for key, value in state.items()}
    words = out.get('bert.embeddings.word_embeddings.weight')
    if words is not None:
        out['bert.embeddings.token_type_embeddings.weight'] = np.zeros_like(words[:1])
    return out


def _to_distil(key: str) -> str:
    layer = re.match(r'^bert\.encoder\.layer\.(\d+)\.(.+)$', key)
    if layer:
        i, rest = layer.groups()
        for distil, bert in DISTILBERT_LAYER:
            if rest.startswith(bert + '.'):
                return f'distilbert.transformer.layer.{i}.{distil}{rest[len(bert):]}'
    if key.startswith('bert.embeddings.'):
        return 'distil' + key
    return _renamed(key, tuple((bert, distil) for distil, bert in DISTILBERT_HEAD))


def to_distilbert(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BERT-named MLM tensors (to_hf's) -> DistilBertForMaskedLM's; the token-type row
    (every token reads it) is folded into each position row, which gives the same sums."""
    tensors = dict(tensors)
    row = tensors.pop('bert.embeddings.token_type_embeddings.weight')
    if row.shape[0] != 1:
        raise ValueError(f'{row.shape[0]} token types; DistilBERT has none')
    positions = 'bert.embeddings.position_embeddings.weight'
    tensors[positions] = tensors[positions] + row[0]
    return {_to_distil(key): value for key, value in tensors.items()}


def electra_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BERT-named tensors (to_hf's) -> ElectraForPreTraining's names."""
    back = tuple((bert, electra) for electra, bert in ELECTRA_PREFIXES)
    return {_renamed(key, back): value for key, value in tensors.items()}


def _leaves(tree: dict, prefix: Path = ()) -> list[Path]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaves(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out
