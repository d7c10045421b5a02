"""The tokenizer of an imported Hugging Face directory, written the way this project keeps it.

Looked for in this order (in the weights directory; for a Trainer checkpoint-N directory,
then in the --hf-dir that holds it):
  wordpiece.json / spm.model  this project's own files (an `export` round trip): copied;
  *.model                     another sentencepiece model: used if ids 0..4 are ours;
  vocab.txt                   WordPiece (do_lower_case/strip_accents from
                              tokenizer_config.json), or a WordPiece tokenizer.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np

from engine.config_cli import ConfigError
from text.tokenizer import MODEL_FILENAME, SPECIAL_PIECES, Tokenizer
from text.wordpiece import WORDPIECE_FILENAME, WordPieceTokenizer, build_wordpiece

# Rows indexed by token id, reordered with the vocabulary.
VOCAB_ROWS = ('bert.embeddings.word_embeddings.weight', 'cls.predictions.bias',
              'cls.predictions.decoder.weight', 'cls.predictions.decoder.bias')


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
    WordPieceTokenizer(str(out / WORDPIECE_FILENAME))  # checks ids 0..4
    return Imported('wordpiece', order)


def _spm_kind(path: pathlib.Path) -> str:
    from convert.tokenizer_files import _model_proto
    return {1: 'unigram', 2: 'bpe'}.get(_model_proto(path.read_bytes()).trainer_spec.model_type,
                                        'unigram')


def _import_own(d: pathlib.Path, out: pathlib.Path) -> Imported | None:
    if (d / WORDPIECE_FILENAME).is_file():
        WordPieceTokenizer(str(d / WORDPIECE_FILENAME))
        shutil.copyfile(d / WORDPIECE_FILENAME, out / WORDPIECE_FILENAME)
        return Imported('wordpiece', None)
    for model in [d / MODEL_FILENAME, *sorted(d.glob('*.model'))]:
        if model.is_file():
            try:
                Tokenizer(str(model))
            except ValueError as e:
                raise ConfigError(f'--hf-dir: {e}') from None
            shutil.copyfile(model, out / MODEL_FILENAME)
            return Imported(_spm_kind(model), None)
    return None


def import_tokenizer(dirs: list[pathlib.Path], out: pathlib.Path) -> Imported:
    """Writes the tokenizer into `out`; the first of `dirs` that has one wins."""
    for d in dirs:
        found = _import_own(d, out) or _import_wordpiece(d, out)
        if found is not None:
            return found
    raise ConfigError(f'--hf-dir: no tokenizer in {dirs[0]} (need vocab.txt, a WordPiece '
                      'tokenizer.json, or a sentencepiece .model with [PAD] [UNK] [CLS] [SEP] '
                      '[MASK] at ids 0..4)')
