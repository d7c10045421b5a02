"""Export verification: the written directory, loaded by transformers, must agree with us.

Runs a fixed padded batch (single texts for the MLM, text pairs for a classifier) through
our model and through `AutoModelFor*.from_pretrained(directory)`, and compares the logits
at every real (unpadded) position; and checks that `AutoTokenizer` gives our ids, with
[CLS]/[SEP] (and token types for pairs), on fixed sentences.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np

from finetune.data import Examples
from finetune.encoding import encode
from models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from models.electra import ElectraForPretraining
from models.heads import BertForQuestionAnswering, BertForTokenClassification
from text.tokenizer import CLS_ID, SEP_ID

TOLERANCE = 1e-4  # max |logit difference| in float32
POOLER_PREFIXES = ('bert.pooler.', 'roberta.pooler.', 'pre_classifier.')
SENTENCES = (
    'The quick brown fox jumps over the lazy dog.',
    'I love this!!! :) #happy',
    "@friend can't wait for the weekend... 3 days to go",
    'Coachella 2015 lineup looks amazing',
    'ok',
    'Numbers like 12,345.67 and e-mail addresses a.b@c.com split oddly.',
    'Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u201cquotes\u201d and emoji \U0001F600',
    'UPPER lower MiXeD',
    '  leading and   repeated   spaces  ',
    'tab\tand\nnewline',
)


class VerificationError(ValueError):
    """The exported directory does not reproduce the model (one-line message)."""


def transformers_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def fixed_batch(tokenizer, pairs: bool, max_len: int) -> dict[str, np.ndarray]:
    """SENTENCES encoded as this project encodes inputs, padded to the longest row."""
    texts = list(SENTENCES)
    examples = Examples(text_a=texts, text_b=texts[1:] + texts[:1] if pairs else None,
                        labels=np.zeros(len(texts), np.int32))
    batch = encode(tokenizer, examples, max_len)
    width = int(batch['attention_mask'].sum(1).max())
    return {k: batch[k][:, :width] for k in ('input_ids', 'token_type_ids', 'attention_mask')}


def our_logits(head: str, model_cfg: BertConfig, params: dict, batch: dict) -> np.ndarray:
    """(B, L, V) MLM logits at every position, (B, L) ELECTRA discriminator logits, or
    (B, C) classifier logits, (B, L, C) token classifier or (B, L, 2) QA logits; float32."""
    cfg = dataclasses.replace(model_cfg, dtype='float32')
    ids = jnp.asarray(batch['input_ids'])
    kwargs = {'token_type_ids': jnp.asarray(batch['token_type_ids']),
              'attention_mask': jnp.asarray(batch['attention_mask'])}
    if head == 'mlm':
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return np.asarray(BertForMaskedLM(cfg).apply({'params': params}, ids, positions,
                                                     **kwargs))
    if head == 'electra':  # the discriminator alone (no token types, as it is trained)
        return np.asarray(ElectraForPretraining(cfg, cfg).apply(
            {'params': params}, ids, kwargs['attention_mask'], None, method='discriminate'))
    model = {'token_classifier': BertForTokenClassification,
             'qa': BertForQuestionAnswering}.get(head, BertForSequenceClassification)
    return np.asarray(model(cfg).apply({'params': params}, ids, **kwargs))


def hf_logits(directory: pathlib.Path, head: str, batch: dict) -> np.ndarray:
    import torch
    import transformers
    auto = {'mlm': transformers.AutoModelForMaskedLM,
            'electra': transformers.AutoModelForPreTraining,
            'classifier': transformers.AutoModelForSequenceClassification,
            'token_classifier': transformers.AutoModelForTokenClassification,
            'qa': transformers.AutoModelForQuestionAnswering}[head]
    model, info = auto.from_pretrained(str(directory), output_loading_info=True)
    # A kept pretrained pooler is written with an MLM export for *ForSequenceClassification
    # to read; the *ForMaskedLM models have none.
    info = {**info, 'unexpected_keys': [k for k in info.get('unexpected_keys') or []
                                        if not k.startswith(POOLER_PREFIXES)]}
    problems = {k: v for k, v in info.items() if v and k != 'error_msgs'}
    if problems or info.get('error_msgs'):
        raise VerificationError(f'transformers reports {problems or info["error_msgs"]}')
    model.eval()
    if model.config.model_type in ('modernbert', 'distilbert'):  # no token types
        batch = {k: v for k, v in batch.items() if k != 'token_type_ids'}
    with torch.no_grad():
        out = model(**{k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()})
    if head == 'qa':  # (B, L, 2) as ours: start, end
        return torch.stack([out.start_logits, out.end_logits], -1).float().numpy()
    return out.logits.float().numpy()


def max_logit_diff(head: str, ours: np.ndarray, theirs: np.ndarray, mask: np.ndarray) -> float:
    if ours.shape != theirs.shape:
        raise VerificationError(f'logit shapes differ: ours {ours.shape}, transformers '
                                f'{theirs.shape}')
    diff = np.abs(ours - theirs)
    if head != 'classifier':
        diff = diff[mask.astype(bool)]  # padded positions are not predictions
    return float(diff.max())


def tokenizer_parity(directory: pathlib.Path, tokenizer, ids: np.ndarray | None = None
                     ) -> tuple[int, int]:
    """(matching, total) fixed inputs, singles and pairs: ids and token types must agree.
    `ids`: our id -> the exported id (None: the same)."""
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    to_hf = (lambda x: list(x)) if ids is None else (lambda x: [int(ids[i]) for i in x])
    matching = total = 0
    for i, text in enumerate(SENTENCES):
        a = to_hf(tokenizer.encode(text))
        other = SENTENCES[(i + 1) % len(SENTENCES)]
        b = to_hf(tokenizer.encode(other))
        single = hf(text)
        pair = hf(text, other)
        cls, sep = to_hf([CLS_ID, SEP_ID])
        if getattr(tokenizer, 'pair_template', 'bert') == 'roberta':  # no token types
            want_pair = [cls, *a, sep, sep, *b, sep]
            types = [0] * len(want_pair)
        else:
            want_pair = [cls, *a, sep, *b, sep]
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        matching += single['input_ids'] == [cls, *a, sep]
        # No token_type_ids (model_input_names without them: RoBERTa's, ModernBERT's): the
        # ids alone, as the model reads no types.
        matching += (pair['input_ids'] == want_pair
                     and pair.get('token_type_ids', types) == types)
        total += 2
    return matching, total


def verify(directory: pathlib.Path, head: str, model_cfg: BertConfig, params: dict,
           tokenizer, ids: np.ndarray | None = None, token_types: bool = True) -> None:
    """Prints the logit difference and tokenizer parity; raises VerificationError when the
    logits differ by more than TOLERANCE or transformers reports missing/unused weights.
    `ids` (our id -> exported id, for an export in an imported BERT's original id order):
    transformers gets the batch in exported ids, and its MLM logits are compared in ours.
    `token_types` False: the exported model reads none, so ours gets type 0 everywhere."""
    if not transformers_available():
        print('verify: skipped (transformers and torch are not installed)', flush=True)
        return
    import transformers
    transformers.logging.set_verbosity_error()  # we report problems ourselves, in one line
    transformers.logging.disable_progress_bar()
    batch = fixed_batch(tokenizer, head in ('classifier', 'qa'),
                        min(64, model_cfg.max_position_embeddings - model_cfg.position_offset))
    if not token_types:
        batch['token_type_ids'] = np.zeros_like(batch['token_type_ids'])
    theirs_batch = batch if ids is None else {**batch, 'input_ids': ids[batch['input_ids']]}
    theirs = hf_logits(directory, head, theirs_batch)
    if ids is not None and head == 'mlm':
        theirs = theirs[..., ids]  # column of exported id ids[i] is our id i's
    diff = max_logit_diff(head, our_logits(head, model_cfg, params, batch), theirs,
                          batch['attention_mask'])
    print(f'max |logit diff|: {diff:.3g} (transformers vs this model, fp32, '
          f'{len(batch["input_ids"])} padded sequences)', flush=True)
    matching, total = tokenizer_parity(directory, tokenizer, ids)
    print(f'tokenizer: {matching}/{total} fixed inputs give the same ids', flush=True)
    if not diff <= TOLERANCE:  # also catches NaN
        raise VerificationError(f'max |logit diff| {diff:.3g} exceeds {TOLERANCE:g}')
