"""Extractive question answering data: SQuAD-format questions read, checked, cut into
overlapping windows, encoded; and the best answer span read back from start/end logits.

Files: SQuAD JSON (`{"data": [{"paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}]}]}]}]}`, v1.1; v2's unanswerable questions are
skipped) or JSONL rows `{"id", "context", "question", "answers": {"text": [...],
"answer_start": [...]}}` (the Hugging Face `squad` layout).

An answer whose text is not at its answer_start in the context is skipped, with one
summary line (a training question left without an answer is skipped too); evaluation
compares against every gold text, as the SQuAD script does.

Encoding, as BERT's run_squad: the context is split into whitespace words, each word into
subwords; a subword's character span comes from its piece text when the pieces spell the
word, else it spans its whole word (normalising tokenizers). [CLS] question [SEP] window
[SEP] with token types 0/1; windows of the context start every doc_stride subwords. A
training window that does not hold the whole answer points at [CLS] (0, 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence

import numpy as np

from finetune import data
from text.tokenizer import CLS_ID, PAD_ID, SEP_ID, UNK_ID

MAX_QUERY_TOKENS = 64  # longer questions are cut (BERT's max_query_length)
_WORD = re.compile(r'\S+')
_PIECE_MARKS = ('\u2581', '##', '\u0120')  # spm word start, WordPiece continuation, BPE space

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class QAExamples:
    """One split: questions with their context, gold answer texts, and for training the
    character start of the answer used as the target (-1: none)."""

    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[list[str]]
    starts: list[int]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text_a(self) -> list[str]:  # a from-scratch run trains its tokenizer on these
        return sorted(set(self.contexts))

    @property
    def text_b(self) -> list[str]:
        return self.questions


def _squad_rows(path: str, text: str) -> list[dict]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise data.error(path, e.lineno, f'not valid JSON ({e.msg})') from None
    if not isinstance(doc, dict) or not isinstance(doc.get('data'), list):
        raise data.error(path, None, 'expected SQuAD JSON: an object with a "data" list')
    rows = []
    for a, article in enumerate(doc['data']):
        paragraphs = article.get('paragraphs') if isinstance(article, dict) else None
        if not isinstance(paragraphs, list) or not all(
                isinstance(p, dict) and isinstance(p.get('qas', []), list)
                and all(isinstance(q, dict) for q in p.get('qas', [])) for p in paragraphs):
            raise data.error(path, None, f'data[{a}]: expected {{"paragraphs": [{{"context", '
                                         '"qas": [{...}]}]}')
        for para in paragraphs:
            for qa in para.get('qas') or []:
                rows.append({'context': para.get('context'), 'question': qa.get('question'),
                             'id': qa.get('id', f'q{len(rows)}'),
                             'answers': qa.get('answers') or [],
                             'impossible': bool(qa.get('is_impossible'))})
    return rows


def _jsonl_rows(path: str, text: str) -> list[dict]:
    rows = []
    for line, row in data.jsonl_values(path, text):
        answers = row.get('answers') if isinstance(row, dict) else None
        if not isinstance(answers, dict):
            raise data.error(path, line, 'expected {"id", "context", "question", "answers": '
                                         '{"text": [...], "answer_start": [...]}}')
        texts, starts = answers.get('text') or [], answers.get('answer_start') or []
        if len(texts) != len(starts):
            raise data.error(path, line, f'{len(texts)} answer texts but {len(starts)} '
                                         'answer_start values')
        rows.append({'context': row.get('context'), 'question': row.get('question'),
                     'id': str(row.get('id', f'line{line}')), 'impossible': not texts,
                     'answers': [{'text': t, 'answer_start': s}
                                 for t, s in zip(texts, starts, strict=True)]})
    return rows


def read_questions(path: str, labelled: bool = True) -> list[dict]:
    """[{'id', 'question', 'context', 'answers': [text], 'start': int, 'target': str}] of
    a SQuAD .json or .jsonl file. Answers not at their answer_start are dropped (one
    summary line); `labelled` questions left without any are skipped too."""
    path = str(path)
    text = data.read_text(path)
    jsonl = os.path.splitext(path)[1].lower() == '.jsonl'
    rows = (_jsonl_rows if jsonl else _squad_rows)(path, text)
    out, misplaced, unanswerable, first_bad = [], 0, 0, None
    for row in rows:
        for key in ('context', 'question'):
            if not isinstance(row[key], str) or not row[key].strip():
                raise data.error(path, None, f'question {row["id"]!r}: empty or missing '
                                             f'{key!r}')
        good = [a for a in row['answers'] if _at_start(row['context'], a)]
        misplaced += len(row['answers']) - len(good)
        if len(good) < len(row['answers']) and first_bad is None:
            first_bad = row['id']
        if labelled and (row['impossible'] or not good):
            unanswerable += 1
            continue
        out.append({'id': str(row['id']), 'question': row['question'].strip(),
                    'context': row['context'], 'answers': [a['text'] for a in good],
                    'start': int(good[0]['answer_start']) if good else -1,
                    'target': good[0]['text'] if good else ''})
    if misplaced:
        log.warning('%s: skipped %d answers whose text is not at their answer_start '
                    '(first: question %r)', path, misplaced, first_bad)
    if unanswerable:
        log.warning('%s: skipped %d questions left without an answer (SQuAD v2 '
                    'unanswerable questions are not supported)', path, unanswerable)
    if not out:
        raise data.error(path, None, 'no answerable questions (an answer must be found at '
                                     'its answer_start)')
    return out


def _at_start(context: str, answer) -> bool:
    if not isinstance(answer, dict) or not isinstance(answer.get('text'), str):
        return False
    start, text = answer.get('answer_start'), answer['text']
    return (isinstance(start, int) and not isinstance(start, bool) and start >= 0
            and bool(text.strip()) and context[start:start + len(text)] == text)


def _examples(rows: Sequence[dict]) -> QAExamples:
    return QAExamples([r['id'] for r in rows], [r['question'] for r in rows],
                      [r['context'] for r in rows], [r['answers'] for r in rows],
                      [r['start'] for r in rows], [r['target'] for r in rows])


def load_task(train_file: str, validation_file: str = '', test_file: str = '', *,
              validation_fraction: float = 0.1, seed: int = 0,
              max_train_examples: int = 0) -> dict:
    """{'train', 'validation', 'test' (None without a file), 'label_names': None}."""
    if not train_file:
        raise ValueError('train_file: empty')
    splits = {split: read_questions(path) if path else None
              for split, path in zip(('train', 'validation', 'test'),
                                     (train_file, validation_file, test_file), strict=True)}
    if splits['validation'] is None:
        rows = [{**r, 'label': None} for r in splits['train']]  # no classes to keep
        splits['train'], splits['validation'] = data.carve_validation(
            rows, validation_fraction, seed)
    if max_train_examples:
        splits['train'] = data.subsample(splits['train'], max_train_examples, seed)
    return {'label_names': None, **{k: None if v is None else _examples(v)
                                    for k, v in splits.items()}}


# ---------------------------------------------------------------- encoding


def _piece_spans(tokenizer, word: str, start: int, ids: list[int]) -> list[tuple[int, int]]:
    """Character spans of a word's subwords: from their piece texts when those spell the
    word, else each the whole word."""
    texts = []
    for i in ids:
        piece = tokenizer.id_to_piece(i)
        for mark in _PIECE_MARKS:
            piece = piece.removeprefix(mark)
        texts.append(piece)
    if ''.join(texts) != word:
        return [(start, start + len(word))] * len(ids)
    spans, at = [], start
    for text in texts:
        spans.append((at, at + len(text)))
        at += len(text)
    return spans


def context_tokens(tokenizer, context: str) -> tuple[list[int], np.ndarray]:
    """(subword ids, int32 (T, 2) character spans) of a context."""
    words = [(m.start(), m.group()) for m in _WORD.finditer(context)]
    pieces = tokenizer.encode_batch([w for _, w in words]) if words else []
    ids, spans = [], []
    for (start, word), word_ids in zip(words, pieces, strict=True):
        word_ids = word_ids or [UNK_ID]
        ids += word_ids
        spans += _piece_spans(tokenizer, word, start, word_ids)
    return ids, np.asarray(spans, np.int32).reshape(-1, 2)


def _window_starts(total: int, room: int, stride: int) -> list[int]:
    starts = [0]
    while starts[-1] + room < total:
        starts.append(starts[-1] + stride)
    return starts


def encode(tokenizer, examples: QAExamples, seq_len: int, doc_stride: int
           ) -> dict[str, np.ndarray]:
    """One row per window: int32 'input_ids', 'token_type_ids', 'attention_mask' (W, L);
    'start_positions', 'end_positions' (W,) of the training target; 'example' (W,) the
    question's index; 'offsets' (W, L, 2) the character span of each context token
    (-1 elsewhere)."""
    roberta = getattr(tokenizer, 'pair_template', 'bert') == 'roberta'
    questions = tokenizer.encode_batch(examples.questions)
    rows: dict[str, list] = {k: [] for k in ('input_ids', 'token_type_ids', 'start_positions',
                                           'end_positions', 'example', 'offsets', 'length')}
    contexts: dict[str, tuple[list[int], np.ndarray]] = {}
    for i, context in enumerate(examples.contexts):
        if context not in contexts:
            contexts[context] = context_tokens(tokenizer, context)
        ids, spans = contexts[context]
        query = questions[i][:MAX_QUERY_TOKENS]
        head = [CLS_ID, *query, SEP_ID] + ([SEP_ID] if roberta else [])
        room = seq_len - len(head) - 1
        if room < 1:
            raise ValueError(f'seq_len: {seq_len} leaves no room for the context after a '
                             f'{len(query)}-token question')
        stride = min(doc_stride or max(room // 2, 1), room)
        for at in _window_starts(len(ids), room, stride):
            _add_window(rows, head, ids[at:at + room], spans[at:at + room], i,
                        _target(examples, i, spans, at, room), roberta)
    return _stack(rows, seq_len)


def _target(examples: QAExamples, i: int, spans: np.ndarray, at: int, room: int
            ) -> tuple[int, int] | None:
    """(first, last) window-relative context token of question i's answer, None if the
    window does not hold all of it (or the question has no target)."""
    start = examples.starts[i]
    if start < 0:
        return None
    end = start + len(examples.targets[i])
    window = spans[at:at + room]
    inside = np.flatnonzero((window[:, 1] > start) & (window[:, 0] < end))
    if not len(inside) or at + room < len(spans) and window[-1, 1] < end:
        return None
    if spans[:at].size and spans[at - 1, 1] > start:  # begins before the window
        return None
    return int(inside[0]), int(inside[-1])


def _add_window(rows: dict, head: list[int], ids: list[int], spans: np.ndarray, example: int,
                target: tuple[int, int] | None, roberta: bool) -> None:
    tokens = [*head, *ids, SEP_ID]
    offsets = np.full((len(tokens), 2), -1, np.int32)
    offsets[len(head):len(head) + len(ids)] = spans
    types = [0] * len(head) + [0 if roberta else 1] * (len(ids) + 1)
    first, last = (0, 0) if target is None else (target[0] + len(head), target[1] + len(head))
    for key, value in (('input_ids', tokens), ('token_type_ids', types), ('offsets', offsets),
                       ('start_positions', first), ('end_positions', last),
                       ('example', example), ('length', len(tokens))):
        rows[key].append(value)


def _stack(rows: dict, seq_len: int) -> dict[str, np.ndarray]:
    n = len(rows['input_ids'])
    out = {'input_ids': np.full((n, seq_len), PAD_ID, np.int32),
           'token_type_ids': np.zeros((n, seq_len), np.int32),
           'offsets': np.full((n, seq_len, 2), -1, np.int32)}
    for r in range(n):
        length = rows['length'][r]
        out['input_ids'][r, :length] = rows['input_ids'][r]
        out['token_type_ids'][r, :length] = rows['token_type_ids'][r]
        out['offsets'][r, :length] = rows['offsets'][r]
    out['attention_mask'] = (np.arange(seq_len) < np.asarray(rows['length'])[:, None]
                             ).astype(np.int32)
    for key in ('start_positions', 'end_positions', 'example'):
        out[key] = np.asarray(rows[key], np.int32)
    return out


# ---------------------------------------------------------------- answers


def best_spans(logits: np.ndarray, encoded: dict[str, np.ndarray], examples: QAExamples,
               max_answer_length: int) -> list[tuple[str, float]]:
    """(answer text, start + end logit) of each question: the best-scoring span over all
    its windows with start <= end, both in the context, at most max_answer_length tokens
    ('' with score -inf if no window has a context token)."""
    best: list[tuple[float, int, int, int]] = [(-np.inf, -1, 0, 0)] * len(examples)
    width = logits.shape[1]
    band = np.triu(np.ones((width, width), bool)) & ~np.triu(np.ones((width, width), bool),
                                                             max_answer_length)
    for w in range(len(logits)):
        valid = encoded['offsets'][w, :width, 0] >= 0
        scores = logits[w, :, 0][:, None] + logits[w, :, 1][None, :]
        scores = np.where(band & valid[:, None] & valid[None, :], scores, -np.inf)
        flat = int(np.argmax(scores))
        score = float(scores.flat[flat])
        i = int(encoded['example'][w])
        if score > best[i][0]:
            best[i] = (score, w, flat // width, flat % width)
    out = []
    for i, (score, w, first, last) in enumerate(best):
        if w < 0:
            out.append(('', score))
            continue
        lo, hi = encoded['offsets'][w, first, 0], encoded['offsets'][w, last, 1]
        out.append((examples.contexts[i][lo:hi], score))
    return out
