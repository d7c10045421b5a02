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

from convert.tokenizer_files import model_proto
from engine.errors import ConfigError
from engine.rundir import SPM_FILENAME, WORDPIECE_FILENAME
from text.tokenizer import SPECIAL_PIECES, Tokenizer
from text.wordpiece import WordPieceTokenizer, build_wordpiece

# Key in the "model" object of wordpiece.json (tokenizers ignores it on load): the imported
# vocabulary in its original id order, written when import moved the special tokens, so
# that `export` restores the original ids (and a re-import of that export moves them again).
ORIGINAL_VOCAB = 'original_vocab'

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
    vocab = (json.loads(text).get('model') or {}).get(ORIGINAL_VOCAB)
    if vocab is None:
        return None
    current = [p for p, _ in sorted(HFTokenizer.from_str(text).get_vocab().items(),
                                    key=lambda kv: kv[1])]
    try:
        order = special_order(vocab)
    except ConfigError:
        order = None
    if order is None or [vocab[i] for i in order] != current:
        raise ConfigError(f'{where}: {path.name} records the original vocabulary of an '
                          'imported BERT, but its own vocabulary is no longer that one '
                          'reordered (changed or resized?); the original token ids cannot be '
                          'restored')
    return vocab, order


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
        return Imported('wordpiece', restored and restored[1])
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
        found = _import_own(d, out) or _import_wordpiece(d, out)
        if found is not None:
            return found
    raise ConfigError(f'--hf-dir: no tokenizer in {dirs[0]} (need vocab.txt, a WordPiece '
                      'tokenizer.json, or a sentencepiece .model with [PAD] [UNK] [CLS] [SEP] '
                      '[MASK] at ids 0..4)')
