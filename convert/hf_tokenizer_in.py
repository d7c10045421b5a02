"""The tokenizer of an imported Hugging Face directory, written the way this project keeps it.

Looked for in this order (in the weights directory; for a Trainer checkpoint-N directory,
then in the --hf-dir that holds it):
  wordpiece.json / spm.model  this project's own files (an `export` round trip): copied;
  *.model                     another sentencepiece model: used if ids 0..4 are ours;
  vocab.txt                   WordPiece (do_lower_case/strip_accents from
                              tokenizer_config.json), or a WordPiece tokenizer.json;
  tokenizer.json (BPE)        a byte-level BPE (RoBERTa): the pipeline as it is, its special
                              tokens (named by tokenizer_config.json, RoBERTa's <s> <pad> </s>
                              <unk> <mask> by default) moved to ids 0..4 under their own names
                              (text '<mask>' is the mask, as in transformers); RoBERTa's pair
                              template (<s> a </s></s> b </s>) is kept; another post-
                              processor (ModernBERT's [CLS] a [SEP] b [SEP], which is
                              this project's own) is kept aside for `export`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np

from convert.tokenizer_files import model_proto
from engine.errors import ConfigError
from engine.rundir import SPM_FILENAME, WORDPIECE_FILENAME
from text.tokenizer import SPECIAL_PIECES, Tokenizer
from text.wordpiece import SPECIAL_NAMES, WordPieceTokenizer, build_wordpiece

# Key in the "model" object of wordpiece.json (tokenizers ignores it on load): the imported
# vocabulary in its original id order, written when import moved the special tokens, so
# that `export` restores the original ids (and a re-import of that export moves them again).
ORIGINAL_VOCAB = 'original_vocab'
# Beside it: a BPE file's own post-processor (ModernBERT's "[CLS] $A [SEP]" template), which
# this project replaces by its own special tokens, so that `export` writes it back.
ORIGINAL_POST = 'original_post_processor'
# Each of SPECIAL_PIECES: its tokenizer_config.json key, the fallback key, RoBERTa's name.
_ROLES = (('pad_token', None, '<pad>'), ('unk_token', None, '<unk>'),
          ('cls_token', 'bos_token', '<s>'), ('sep_token', 'eos_token', '</s>'),
          ('mask_token', None, '<mask>'))

# Rows indexed by token id, reordered with the vocabulary.
VOCAB_ROWS = ('bert.embeddings.word_embeddings.weight', 'cls.predictions.bias',
              'cls.predictions.decoder.weight', 'cls.predictions.decoder.bias',
              # ModernBERT's (convert/modernbert.py)
              'model.embeddings.tok_embeddings.weight', 'decoder.weight', 'decoder.bias')


@dataclasses.dataclass(frozen=True)
class Imported:
    kind: str  # config data.tokenizer_type: 'unigram', 'bpe' or 'wordpiece'
    order: list[int] | None  # new id -> old id, None when unchanged

    @property
    def moved(self) -> bool:
        return self.order is not None


def special_order(vocab: list[str]) -> list[int] | None:
    """new id -> old id moving SPECIAL_PIECES to ids 0..4 by swaps (others keep their ids
    where possible); None if they are there already."""
    index = {piece: i for i, piece in enumerate(vocab)}
    missing = [p for p in SPECIAL_PIECES if p not in index]
    if missing:
        raise ConfigError(f'--hf-dir: the vocabulary has no {" ".join(missing)}')
    order = list(range(len(vocab)))
    position = list(range(len(vocab)))  # old id -> current new id
    for new, piece in enumerate(SPECIAL_PIECES):
        old = index[piece]
        at = position[old]
        displaced = order[new]
        order[new], order[at] = old, displaced
        position[old], position[displaced] = new, at
    return None if order == list(range(len(vocab))) else order


def reorder_vocab(state: dict[str, np.ndarray], order: list[int] | None) -> dict:
    """Applies the vocabulary reordering to the rows of every id-indexed tensor."""
    if order is None:
        return state
    out = dict(state)
    for key in VOCAB_ROWS:
        if key in out:
            rows = out[key]
            if rows.shape[0] < len(order):
                raise ConfigError(f'--hf-dir: {key} has {rows.shape[0]} rows for a '
                                  f'{len(order)}-token vocabulary')
            perm = np.concatenate([order, np.arange(len(order), rows.shape[0])])
            out[key] = rows[perm]
    return out


def _record_original(path: pathlib.Path, vocab: list[str]) -> None:
    data = json.loads(path.read_text(encoding='utf-8'))
    data['model'][ORIGINAL_VOCAB] = list(vocab)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding='utf-8')


def original_order(path, where: str) -> tuple[list[str], list[int]] | None:
    """(original vocabulary, new id -> original id) that `import` recorded in the WordPiece
    file `path` (pathlib or epath); None when the ids were never moved. A ConfigError
    (`where` names the argument) when the file's vocabulary is no longer the recorded one
    reordered."""
    from tokenizers import Tokenizer as HFTokenizer
    text = path.read_text(encoding='utf-8')
    model = json.loads(text).get('model') or {}
    vocab = model.get(ORIGINAL_VOCAB)
    if vocab is None:
        return None
    renamed = _renamed(vocab, model.get(SPECIAL_NAMES))
    current = [p for p, _ in sorted(HFTokenizer.from_str(text).get_vocab().items(),
                                    key=lambda kv: kv[1])]
    try:
        order = special_order(renamed)
    except ConfigError:
        order = None
    if model.get(SPECIAL_NAMES) and order is None:
        order = list(range(len(vocab)))  # specials at 0..4 already: the original ids
    if order is None or [vocab[i] for i in order] != current:
        raise ConfigError(f'{where}: {path.name} records the original vocabulary of an '
                          'imported BERT, but its own vocabulary is no longer that one '
                          'reordered (changed or resized?); the original token ids cannot be '
                          'restored')
    return vocab, order


def _renamed(vocab: list[str], originals: list[str] | None) -> list[str]:
    """`vocab` with the special names `originals` spelled as SPECIAL_PIECES (to find where
    they are; the pipeline keeps its own names)."""
    rename = dict(zip(originals or (), SPECIAL_PIECES, strict=False))
    return [rename.get(piece, piece) for piece in vocab]


def _token_name(value) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    return value.get('content') if isinstance(value, dict) else value


def _special_names(d: pathlib.Path) -> list[str]:
    """The tokens of d's tokenizer playing [PAD] [UNK] [CLS] [SEP] [MASK], in that order."""
    settings: dict = {}
    for name in ('special_tokens_map.json', 'tokenizer_config.json'):
        if (d / name).is_file():
            settings.update(json.loads((d / name).read_text(encoding='utf-8')))
    return [_token_name(settings.get(key)) or _token_name(settings.get(other or key))
            or default for key, other, default in _ROLES]


def relabel(data: dict, new_id: list[int]) -> dict:
    """A tokenizer.json (BPE) with old id i moved to new_id[i]: its vocabulary, added
    tokens and RoBERTa post-processor. The model's vocabulary gets every piece, the added
    tokens too: tokenizers numbers an added token missing from it after the vocabulary,
    whatever id the file gives it."""
    vocab = _bpe_vocab(data)
    data = json.loads(json.dumps(data))  # a deep copy
    model = data['model']
    model['vocab'] = {p: new_id[i] for i, p in enumerate(vocab)}
    for token in data.get('added_tokens') or []:
        token['id'] = new_id[token['id']]
    post = data.get('post_processor') or {}
    _relabel_post(post, new_id)
    _relabel_post((data['model'].get(ORIGINAL_POST) or {}), new_id)
    return data


def _relabel_post(post: dict, new_id: list[int]) -> None:
    """A RoBERTa or template post-processor's token ids, in place."""
    for key in ('cls', 'sep') if post.get('type') == 'RobertaProcessing' else ():
        piece, old = post[key]
        post[key] = [piece, new_id[old]]
    if post.get('type') == 'TemplateProcessing':
        for token in (post.get('special_tokens') or {}).values():
            token['ids'] = [new_id[i] for i in token['ids']]


def _bpe_vocab(data: dict) -> list[str]:
    """The pieces of a tokenizer.json in id order (its added tokens included)."""
    ids = dict(data['model']['vocab'])
    for token in data.get('added_tokens') or []:
        ids.setdefault(token['content'], token['id'])
    if sorted(ids.values()) != list(range(len(ids))):
        raise ConfigError('--hf-dir: tokenizer.json: the token ids are not 0..N-1')
    return [piece for piece, _ in sorted(ids.items(), key=lambda kv: kv[1])]


def _import_bpe(d: pathlib.Path, out: pathlib.Path) -> Imported | None:
    if not (d / 'tokenizer.json').is_file():
        return None
    data = json.loads((d / 'tokenizer.json').read_text(encoding='utf-8'))
    if (data.get('model') or {}).get('type') != 'BPE':
        return None
    vocab, originals = _bpe_vocab(data), _special_names(d)
    clash = sorted(set(SPECIAL_PIECES) & set(vocab) - set(originals))
    if clash:
        raise ConfigError(f'--hf-dir: tokenizer.json has {" ".join(clash)} as ordinary tokens')
    order = special_order(_renamed(vocab, originals))
    new_id = np.argsort(order).tolist() if order is not None else list(range(len(vocab)))
    ours = relabel(data, new_id)
    if (ours.get('post_processor') or {}).get('type') != 'RobertaProcessing':
        ours['model'][ORIGINAL_POST] = ours['post_processor']
        ours['post_processor'] = None  # this project adds the special tokens itself
    ours['model'][ORIGINAL_VOCAB] = vocab
    ours['model'][SPECIAL_NAMES] = originals
    (out / WORDPIECE_FILENAME).write_text(json.dumps(ours, ensure_ascii=False),
                                          encoding='utf-8')
    WordPieceTokenizer(str(out / WORDPIECE_FILENAME))  # checks ids 0..4
    return Imported('bpe', order)


def original_pipeline(path: pathlib.Path) -> tuple[dict, list[str]] | None:
    """(tokenizer.json, its special token names) of an imported BPE file `path` as it was
    imported: original names and ids; None for any other file."""
    data = json.loads(path.read_text(encoding='utf-8'))
    model = data.get('model') or {}
    originals = model.pop(SPECIAL_NAMES, None)
    vocab = model.pop(ORIGINAL_VOCAB, None)
    if originals is None or vocab is None:
        return None
    if model.get(ORIGINAL_POST) is not None:
        data['post_processor'] = model[ORIGINAL_POST]
    model.pop(ORIGINAL_POST, None)
    index = {piece: i for i, piece in enumerate(vocab)}
    current = _bpe_vocab(data)
    new_id = [index[piece] for piece in current]
    return relabel(data, new_id), originals


def _wordpiece_settings(d: pathlib.Path) -> tuple[bool, bool | None]:
    config = d / 'tokenizer_config.json'
    settings = json.loads(config.read_text()) if config.is_file() else {}
    return bool(settings.get('do_lower_case', True)), settings.get('strip_accents')


def _vocab_from_tokenizer_json(path: pathlib.Path) -> tuple[list[str], bool] | None:
    data = json.loads(path.read_text(encoding='utf-8'))
    model = data.get('model') or {}
    if model.get('type') != 'WordPiece':
        return None
    vocab = [p for p, _ in sorted(model['vocab'].items(), key=lambda kv: kv[1])]
    normalizer = data.get('normalizer') or {}
    return vocab, bool(normalizer.get('lowercase', True))


def _import_wordpiece(d: pathlib.Path, out: pathlib.Path) -> Imported | None:
    if (d / 'vocab.txt').is_file():
        vocab = (d / 'vocab.txt').read_text(encoding='utf-8').splitlines()
        lowercase, strip_accents = _wordpiece_settings(d)
    elif (d / 'tokenizer.json').is_file():
        found = _vocab_from_tokenizer_json(d / 'tokenizer.json')
        if found is None:
            return None
        (vocab, lowercase), strip_accents = found, None
    else:
        return None
    order = special_order(vocab)
    ordered = vocab if order is None else [vocab[i] for i in order]
    pipeline = build_wordpiece(ordered, lowercase=lowercase, strip_accents=strip_accents)
    pipeline.save(str(out / WORDPIECE_FILENAME))
    if order is not None:
        _record_original(out / WORDPIECE_FILENAME, vocab)
    WordPieceTokenizer(str(out / WORDPIECE_FILENAME))  # checks ids 0..4
    return Imported('wordpiece', order)


def _spm_kind(path: pathlib.Path) -> str:
    return {1: 'unigram', 2: 'bpe'}.get(model_proto(path.read_bytes()).trainer_spec.model_type,
                                        'unigram')


def _import_own(d: pathlib.Path, out: pathlib.Path) -> Imported | None:
    if (d / WORDPIECE_FILENAME).is_file():
        WordPieceTokenizer(str(d / WORDPIECE_FILENAME))
        # An export of an imported BERT holds its weights in the original id order.
        restored = original_order(d / WORDPIECE_FILENAME, '--hf-dir')
        shutil.copyfile(d / WORDPIECE_FILENAME, out / WORDPIECE_FILENAME)
        model = json.loads((d / WORDPIECE_FILENAME).read_text(encoding='utf-8'))['model']
        kind = 'bpe' if model.get('type') == 'BPE' else 'wordpiece'
        return Imported(kind, restored and restored[1])
    for model in [d / SPM_FILENAME, *sorted(d.glob('*.model'))]:
        if model.is_file():
            try:
                Tokenizer(str(model))
            except ValueError as e:
                raise ConfigError(f'--hf-dir: {e}') from None
            shutil.copyfile(model, out / SPM_FILENAME)
            return Imported(_spm_kind(model), None)
    return None


def import_tokenizer(dirs: list[pathlib.Path], out: pathlib.Path) -> Imported:
    """Writes the tokenizer into `out`; the first of `dirs` that has one wins."""
    for d in dirs:
        found = _import_own(d, out) or _import_wordpiece(d, out) or _import_bpe(d, out)
        if found is not None:
            return found
    raise ConfigError(f'--hf-dir: no tokenizer in {dirs[0]} (need vocab.txt, a WordPiece '
                      'or BPE tokenizer.json, or a sentencepiece .model with [PAD] [UNK] [CLS] '
                      '[SEP] [MASK] at ids 0..4)')
