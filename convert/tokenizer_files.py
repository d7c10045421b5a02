"""This project's tokenizer as a `tokenizers` pipeline that `transformers.AutoTokenizer` loads.

A sentencepiece model (unigram or BPE) is rebuilt from its model proto: the same pieces and
scores (BPE merges ordered by the merged piece's score, as sentencepiece merges), its
precompiled NFKC charsmap, whitespace collapsed and stripped, '▁' for spaces. A WordPiece
workdir's pipeline is used as it is. Both get a post-processor that adds [CLS] ... [SEP]
(and [CLS] a [SEP] b [SEP] with token type 1 for b), as finetune/data.py encodes, and the
five special tokens at this project's fixed ids 0..4.

Known difference (measured, see README): sentencepiece keeps a lone '▁' piece before a
[MASK] written in the text ('the [MASK]' -> '▁the ▁ [MASK]'); this pipeline strips it
('▁the [MASK]'), which is how masked pretraining inputs look.
"""

from __future__ import annotations

import json
import pathlib

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from text.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_PIECES, UNK_ID

_UNIGRAM, _BPE = 1, 2  # sentencepiece TrainerSpec.ModelType
_NORMAL = 1  # sentencepiece piece type of ordinary pieces
SPECIAL_TOKENS = {'pad_token': SPECIAL_PIECES[PAD_ID], 'unk_token': SPECIAL_PIECES[UNK_ID],
                  'cls_token': SPECIAL_PIECES[CLS_ID], 'sep_token': SPECIAL_PIECES[SEP_ID],
                  'mask_token': SPECIAL_PIECES[MASK_ID]}


def model_proto(model_bytes: bytes):
    # sentencepiece ships the generated protobuf module; it needs the protobuf package.
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, best merged-piece score first: sentencepiece
    BPE repeatedly merges the adjacent pair whose merged piece scores highest."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = []
    for i, p in enumerate(proto.pieces):
        if p.type != _NORMAL:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-p.score, i, vocab[left], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def _spm_model(proto) -> models.Model:
    kind = proto.trainer_spec.model_type
    if kind == _UNIGRAM:
        return models.Unigram([(p.piece, p.score) for p in proto.pieces], UNK_ID, False)
    if kind == _BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        return models.BPE(vocab, _bpe_merges(proto), unk_token=SPECIAL_PIECES[UNK_ID],
                          fuse_unk=True)
    raise ValueError(f'sentencepiece model type {kind} is neither unigram nor BPE')


def from_sentencepiece(model_bytes: bytes) -> Tokenizer:
    """A `tokenizers.Tokenizer` giving the ids this sentencepiece model gives."""
    proto = model_proto(model_bytes)
    spec = proto.normalizer_spec
    if not spec.add_dummy_prefix or not spec.escape_whitespaces:
        raise ValueError('sentencepiece models without add_dummy_prefix/escape_whitespaces '
                         'are not supported')
    tok = Tokenizer(_spm_model(proto))
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap \
        else []
    if spec.remove_extra_whitespaces:  # sentencepiece: no leading/trailing/repeated spaces
        steps += [normalizers.Replace(Regex(' {2,}'), ' '), normalizers.Strip()]
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁', prepend_scheme='always',
                                                 split=bool(proto.trainer_spec.split_by_whitespace))
    tok.decoder = decoders.Metaspace(replacement='▁', prepend_scheme='always')
    return tok


def with_bert_specials(tok: Tokenizer, special_ids: list[int] | None = None) -> Tokenizer:
    """Adds the special tokens (matched in text too, e.g. [MASK]) and the BERT template.
    `special_ids`: where the vocabulary holds SPECIAL_PIECES (default this project's 0..4;
    an imported WordPiece vocabulary exported in its original id order has its own)."""
    special_ids = list(range(len(SPECIAL_PIECES))) if special_ids is None else special_ids
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPECIAL_PIECES])
    for i, t in zip(special_ids, SPECIAL_PIECES, strict=True):
        if tok.token_to_id(t) != i:
            raise ValueError(f'special token {t} has id {tok.token_to_id(t)}, expected {i}')
    cls, sep = SPECIAL_PIECES[CLS_ID], SPECIAL_PIECES[SEP_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f'{cls} $A:0 {sep}:0', pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
        special_tokens=[(cls, special_ids[CLS_ID]), (sep, special_ids[SEP_ID])])
    return tok


def write_hf_tokenizer(tok: Tokenizer, directory: pathlib.Path, model_max_length: int,
                       extra: dict | None = None, special_ids: list[int] | None = None) -> None:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json in `directory`."""
    tok = with_bert_specials(tok, special_ids)
    tok.save(str(directory / 'tokenizer.json'))
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': model_max_length,
              'model_input_names': ['input_ids', 'token_type_ids', 'attention_mask'],
              'padding_side': 'right', 'clean_up_tokenization_spaces': False,
              **SPECIAL_TOKENS, **(extra or {})}
    (directory / 'tokenizer_config.json').write_text(json.dumps(config, indent=2) + '\n')
    (directory / 'special_tokens_map.json').write_text(json.dumps(SPECIAL_TOKENS, indent=2) + '\n')


def write_original(data: dict, specials: list[str], directory: pathlib.Path,
                   model_max_length: int) -> None:
    """An imported tokenizer.json (`data`, its original names and ids; special tokens
    `specials`, the original names of SPECIAL_PIECES) and its transformers config files.
    No token types: RoBERTa's pair template has none."""
    (directory / 'tokenizer.json').write_text(json.dumps(data, ensure_ascii=False),
                                              encoding='utf-8')
    tokens = {key: specials[SPECIAL_PIECES.index(piece)] for key, piece in SPECIAL_TOKENS.items()}
    tokens.update(bos_token=tokens['cls_token'], eos_token=tokens['sep_token'])
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': model_max_length,
              'model_input_names': ['input_ids', 'attention_mask'], 'padding_side': 'right',
              'clean_up_tokenization_spaces': False, **tokens}
    (directory / 'tokenizer_config.json').write_text(json.dumps(config, indent=2) + '\n')
    (directory / 'special_tokens_map.json').write_text(json.dumps(tokens, indent=2) + '\n')
