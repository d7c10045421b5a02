"""SentencePiece tokenizer with BERT's special tokens at fixed ids.

Every tokenizer used by this codebase, trained here or given by the user, has
[PAD] [UNK] [CLS] [SEP] [MASK] at ids 0..4, so the model, masking and packing
code can use constant ids instead of asking the tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from engine.errors import ConfigError
from engine.paths import absolute_path, write_bytes_atomic
from engine.rundir import SPM_FILENAME, RunDir
from text.special import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_PIECES, UNK_ID
from text.wordpiece import WordPieceTokenizer

MODEL_TYPES = ('unigram', 'bpe')
MODEL_FILENAME = SPM_FILENAME
# Ids that decode() drops. [UNK] stays: spm renders it as ' ⁇ ', which shows that text was lost.
_SKIPPED_ON_DECODE = frozenset({PAD_ID, CLS_ID, SEP_ID, MASK_ID})
_WORD_START = '\u2581'  # '▁', spm's marker for a preceding space

log = logging.getLogger(__name__)


class Tokenizer:
    """A sentencepiece model whose first five pieces are SPECIAL_PIECES."""

    pair_template = 'bert'  # text pairs: [CLS] a [SEP] b [SEP] (see text/wordpiece.py)

    def __init__(self, model_path: str):
        self.path = str(model_path)
        try:
            self.model_bytes = epath.Path(self.path).read_bytes()
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f'tokenizer {self.path}: cannot load a sentencepiece model '
                             f'({type(e).__name__}: {e})') from None
        self.vocab_size = int(self._sp.get_piece_size())
        self._check_special_pieces()

    def _check_special_pieces(self) -> None:
        if self.vocab_size <= len(SPECIAL_PIECES):
            raise ConfigError(f'tokenizer {self.path}: only {self.vocab_size} pieces')
        for i, want in enumerate(SPECIAL_PIECES):
            got = self._sp.id_to_piece(i)
            if got != want:
                raise ValueError(
                    f'tokenizer {self.path}: id {i} is {got!r}, expected {want!r} (ids 0..4 '
                    f'must be {" ".join(SPECIAL_PIECES)}; retrain it with train_tokenizer)')

    @property
    def fingerprint(self) -> str:
        """sha256 of the model file: identifies the tokenizer in data caches."""
        return hashlib.sha256(self.model_bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """encode() of each text; spm spreads a batch over num_threads (0 = all cores)."""
        return self._sp.encode(list(texts), out_type=int,
                               num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; [PAD] [CLS] [SEP] [MASK] are skipped."""
        return self._sp.decode([int(i) for i in ids if int(i) not in _SKIPPED_ON_DECODE])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def word_start_mask(self) -> np.ndarray:
        """bool (vocab_size,): True for pieces that begin a word, and for the special ids.

        Whole-word masking groups a word-start piece with the non-start pieces after it.
        """
        pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size)]
        mask = np.array([p.startswith(_WORD_START) for p in pieces], dtype=bool)
        mask[:len(SPECIAL_PIECES)] = True
        return mask


MAX_SENTENCE_BYTES = 1 << 16  # spm skips longer sentences (max_sentence_length, in bytes)


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    # spm treats each item as a sentence; blank ones only waste its sampling budget.
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield from _chunks(line, MAX_SENTENCE_BYTES)  # shorter lines: unchanged


def _chunks(line: str, limit: int) -> Iterator[str]:
    """`line`, or for a line over `limit` UTF-8 bytes, pieces of at most `limit` bytes cut
    at spaces (at a character boundary in a run without one): spm would skip it whole,
    and a corpus of such lines would leave it nothing to train on."""
    data = line.encode('utf-8')
    if len(data) <= limit:
        yield line
        return
    while len(data) > limit:
        cut = data.rfind(b' ', 1, limit + 1)
        if cut <= 0:
            cut = limit
            while data[cut] & 0xC0 == 0x80:  # not inside a multi-byte character
                cut -= 1
        piece, data = data[:cut].strip(), data[cut:]
        if piece:
            yield piece.decode('utf-8')
    if data.strip():
        yield data.strip().decode('utf-8')


def _spm_train(texts: Iterable[str], vocab_size: int, model_type: str) -> bytes:
    writer = io.BytesIO()
    spm.set_random_generator_seed(0)  # spm samples sentences/seeds; fix it for reproducibility
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(texts), model_writer=writer,
        vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=CLS_ID, eos_id=SEP_ID,
        pad_piece='[PAD]', unk_piece='[UNK]', bos_piece='[CLS]', eos_piece='[SEP]',
        user_defined_symbols=['[MASK]'],  # first id after the four control ids: 4
        # Soft limit: a corpus with fewer distinct pieces than asked gives a smaller
        # vocabulary instead of an error (the model's vocab_size may exceed the tokenizer's).
        hard_vocab_limit=False,
        # Big corpora: spm samples this many sentences (seeded) to bound time and memory.
        input_sentence_size=2_000_000, shuffle_input_sentence=True,
        max_sentence_length=MAX_SENTENCE_BYTES,  # one-document-per-line files have long lines
        # Unigram: prune the seed vocabulary faster, one EM pass per round. On the demo
        # tweets (vocab 8000) this halves the CPU time of spm's defaults (0.75, 2), ~10 s ->
        # ~5 s, with the same held-out tokens per text. BPE ignores both.
        shrinking_factor=0.5, num_sub_iterations=1,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    return writer.getvalue()


def _spm_error(e: RuntimeError, vocab_size: int) -> ConfigError:
    msg = str(e)
    limit = re.search(r'value <= (\d+)', msg)
    if limit:
        return ConfigError(f'model.vocab_size={vocab_size} is too large for this corpus; '
                          f'set it to at most {limit.group(1)}')
    if 'smaller than required_chars' in msg or 'Vocabulary size is smaller' in msg:
        return ConfigError(f'model.vocab_size={vocab_size} is smaller than the number of '
                          f'distinct characters in the corpus; increase it')
    if 'sentences_.empty()' in msg:
        return ConfigError('tokenizer training failed: the training text is empty')
    last = msg.strip().splitlines()[-1] if msg.strip() else type(e).__name__
    return ConfigError(f'tokenizer training failed: {last}')


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int,
                    model_type: str = 'unigram') -> Tokenizer:
    """Trains a sentencepiece model on `texts` in-process and writes it to `model_path`.

    The vocabulary is a soft limit: a small corpus yields fewer pieces (logged as a
    warning) rather than an error. Training is deterministic for a given corpus.
    """
    if model_type not in MODEL_TYPES:
        raise ConfigError(f'data.tokenizer_type: must be one of {MODEL_TYPES}, got {model_type!r}')
    if vocab_size <= len(SPECIAL_PIECES):
        raise ConfigError(f'model.vocab_size={vocab_size} must exceed {len(SPECIAL_PIECES)}')
    try:
        data = _spm_train(texts, vocab_size, model_type)
    except RuntimeError as e:
        raise _spm_error(e, vocab_size) from None
    write_bytes_atomic(model_path, data)  # readers never see a half-written model
    tok = Tokenizer(model_path)
    if tok.vocab_size < vocab_size:
        log.warning('tokenizer: corpus supports only %d of the %d requested pieces',
                    tok.vocab_size, vocab_size)
    return tok


def load_or_train_tokenizer(workdir: str, texts: Callable[[], Iterable[str]], vocab_size: int,
                            model_type: str, model_file: str = '') -> Tokenizer:
    """The run's tokenizer, kept at WORKDIR/spm.model.

    model_file given: validated and copied there. Otherwise an existing WORKDIR/spm.model
    is reused (a resumed run keeps its ids), else one is trained on texts().
    """
    target = str(absolute_path(workdir) / MODEL_FILENAME)
    existing = tokenizer_file(workdir)
    if existing and not model_file and existing != target:  # an imported WordPiece run
        return load_tokenizer(existing)
    if model_file:
        if not epath.Path(model_file).is_file():
            raise ValueError(f'data.tokenizer_model: no such file {model_file!r}')
        given = Tokenizer(model_file)  # validate before it replaces anything
        if str(absolute_path(model_file)) != target:
            write_bytes_atomic(target, given.model_bytes)
        return Tokenizer(target)
    if epath.Path(target).exists():
        return Tokenizer(target)
    return train_tokenizer(texts(), target, vocab_size, model_type)


def tokenizer_file(directory: str) -> str | None:
    """The tokenizer a workdir holds: spm.model, or wordpiece.json (an imported WordPiece
    BERT, see text/wordpiece.py); None if neither."""
    return RunDir(directory).tokenizer_file()


def load_tokenizer(path: str):
    """A sentencepiece Tokenizer, or a WordPieceTokenizer for a wordpiece .json file."""
    if str(path).endswith('.json'):
        return WordPieceTokenizer(path)
    return Tokenizer(path)
