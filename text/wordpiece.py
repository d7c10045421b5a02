"""WordPiece tokenizers (imported Hugging Face BERTs) behind the same interface as Tokenizer.

A workdir that holds WORDPIECE_FILENAME (a `tokenizers` pipeline: BERT normalizer and
pre-tokenizer, WordPiece model) instead of spm.model uses it for pretraining, fine-tuning
and prediction. `launch.py import` writes it from a `vocab.txt`, reordered so that the five
special tokens sit at ids 0..4 like every tokenizer of this project. An imported RoBERTa's
byte-level BPE pipeline is kept in the same file and read by the same class: its special
tokens keep their names (SPECIAL_NAMES) at ids 0..4, its words start with 'Ġ', and its
RobertaProcessing post-processor makes `pair_template` 'roberta'.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
from etils import epath
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders
from tokenizers.implementations import BertWordPieceTokenizer

from text.special import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_PIECES

_CONTINUATION = '##'
_BYTE_LEVEL_SPACE = '\u0120'  # 'Ġ': byte-level BPE's marker for a preceding space
# Key in the "model" object of an imported BPE pipeline: its own names of SPECIAL_PIECES
# (RoBERTa's <pad> <unk> <s> </s> <mask>), which it keeps at ids 0..4.
SPECIAL_NAMES = 'original_specials'


def build_wordpiece(vocab: Sequence[str], lowercase: bool = True,
                    strip_accents: bool | None = None) -> HFTokenizer:
    """BERT's WordPiece pipeline over `vocab` (ids = positions), without post-processing."""
    bert = BertWordPieceTokenizer({piece: i for i, piece in enumerate(vocab)},
                                  lowercase=lowercase, strip_accents=strip_accents,
                                  unk_token=SPECIAL_PIECES[1])
    tok = bert._tokenizer  # the underlying pipeline; we add our own post-processing
    tok.post_processor = None
    tok.decoder = decoders.WordPiece(prefix=_CONTINUATION)
    return tok


class WordPieceTokenizer:
    """Same methods as text.tokenizer.Tokenizer, over a saved `tokenizers` pipeline."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            self._bytes = epath.Path(self.path).read_bytes()
            self._tok = HFTokenizer.from_str(self._bytes.decode('utf-8'))
        except Exception as e:  # OSError, UnicodeError, or tokenizers' plain Exception
            raise ValueError(f'tokenizer {self.path}: cannot load a WordPiece tokenizer '
                             f'({type(e).__name__}: {e})') from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        data = json.loads(self._bytes)
        self.byte_level = (data.get('model') or {}).get('type') == 'BPE'
        post = (data.get('post_processor') or {}).get('type')
        # How text pairs are joined (finetune/encoding.py): 'bert' [CLS] a [SEP] b [SEP]
        # with token types, 'roberta' [CLS] a [SEP] [SEP] b [SEP] without.
        self.pair_template = 'roberta' if post == 'RobertaProcessing' else 'bert'
        names = (data.get('model') or {}).get(SPECIAL_NAMES) or SPECIAL_PIECES
        for i, want in enumerate(names):
            if self._tok.id_to_token(i) != want:
                raise ValueError(f'tokenizer {self.path}: id {i} is '
                                 f'{self._tok.id_to_token(i)!r}, expected {want!r}')

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        del num_threads  # the tokenizers library sizes its own thread pool
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; [PAD] [CLS] [SEP] [MASK] are skipped, [UNK] kept (as Tokenizer)."""
        kept = [int(i) for i in ids if int(i) not in (PAD_ID, CLS_ID, SEP_ID, MASK_ID)]
        return self._tok.decode(kept, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def word_start_mask(self) -> np.ndarray:
        """True for pieces that begin a word (no '##'; byte-level BPE: a leading 'Ġ'), and
        for the special ids."""
        pieces = [self._tok.id_to_token(i) or '' for i in range(self.vocab_size)]
        if self.byte_level:
            starts = [p.startswith(_BYTE_LEVEL_SPACE) for p in pieces]
        else:
            starts = [not p.startswith(_CONTINUATION) for p in pieces]
        mask = np.array(starts, dtype=bool)
        mask[:len(SPECIAL_PIECES)] = True
        return mask
