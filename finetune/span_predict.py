"""`launch.py predict` of a token-classification or extractive-QA run, as JSONL.

Token classification input: .jsonl rows with a "tokens" list, a .txt file (or `-`, standard
input) with one sentence a line (split at whitespace), or a CoNLL-style file (the first
field of each line a word; any labels are ignored). Output, a line per sentence:
{"tokens": [...], "labels": [...]}.

Extractive QA input: SQuAD JSON or .jsonl rows with "context" and "question" (answers
optional, ignored). Output, a line per question: {"id", "question", "answer", "score"}
(score: start + end logit of the span).
"""

from __future__ import annotations

import json
import os
import sys

import jax
from etils import epath

from engine.errors import ConfigError
from engine.paths import absolute_path, local_file_argument
from engine.rundir import RunDir
from finetune import data, predict, qa, span_tasks, tokens
from text.tokenizer import load_tokenizer


def is_span_run(workdir: str) -> bool:
    """Whether `workdir` is a finished-looking run of one of span_tasks.TASKS."""
    run = RunDir(absolute_path(workdir))
    return run.config_file.is_file() and span_tasks.handles(run.read_config().get('task', ''))


def _sentences(path: str) -> tokens.TokenExamples:
    if path == '-' or os.path.splitext(path)[1].lower() == '.txt':
        raw = sys.stdin.read() if path == '-' else data.read_text(path)  # UTF-8, or one line
        words = [line.split() for line in raw.splitlines() if line.strip()]
        if not words:
            raise ConfigError(f'--input: {path} has no sentences')
        return tokens.TokenExamples(words, None, list(range(1, len(words) + 1)))
    rows = tokens.read_sentences(path, labelled=False)
    return tokens.TokenExamples([r['words'] for r in rows], None, [r['line'] for r in rows])


def read_inputs(task: str, path: str):
    """The examples of --input for `task`; one-line ConfigErrors for bad files."""
    if path != '-' and not epath.Path(path).is_file():
        raise ConfigError(f'--input: no such file {path!r}')
    if path == '-' and task != span_tasks.TOKENS:
        raise ConfigError('--input: extractive QA reads a SQuAD .json or .jsonl file, not '
                          'standard input')
    try:
        if task == span_tasks.TOKENS:
            return _sentences(path)
        rows = qa.read_questions(path, labelled=False)
        return qa.QAExamples([r['id'] for r in rows], [r['question'] for r in rows],
                             [r['context'] for r in rows], [r['answers'] for r in rows],
                             [-1] * len(rows), [''] * len(rows))
    except ValueError as e:  # names the file (and line)
        raise ConfigError(f'--input: {e}') from None


def _records(cfg, examples, logits, encoded, label_names) -> list[dict]:
    if cfg.task == span_tasks.TOKENS:
        tags = tokens.word_predictions(logits.argmax(-1), encoded['labels'], examples,
                                       label_names)
        return [{'tokens': w, 'labels': t} for w, t in zip(examples.words, tags, strict=True)]
    answers = qa.best_spans(logits, encoded, examples, cfg.data.get('max_answer_length', 30))
    return [{'id': i, 'question': q, 'answer': a, 'score': round(s, 4)}
            for i, q, (a, s) in zip(examples.ids, examples.questions, answers, strict=True)]


def run(workdir: str, input_path: str, output_path: str = '') -> None:
    local_file_argument(input_path, '--input', 'predict')
    if output_path:
        local_file_argument(output_path, '--output', 'predict')
        predict.check_output(output_path, input_path)
    root = absolute_path(workdir)
    predict.check_finished_run(root)
    examples = read_inputs(RunDir(root).read_config()['task'], input_path)
    cfg, model, params, label_names = predict.load_run(root)
    tokenizer = load_tokenizer(RunDir(root).tokenizer_file())
    encoded = span_tasks.encode(cfg, tokenizer, examples, label_names)
    apply = predict.logits_fn(model)
    params = jax.device_put(params)
    logits = span_tasks.all_logits(lambda b: apply(params, b), encoded, predict.BATCH_SIZE,
                                   dynamic_padding=bool(cfg.data.get('dynamic_padding', True)))
    lines = ''.join(json.dumps(r) + '\n' for r in _records(cfg, examples, logits, encoded,
                                                          label_names))
    if output_path:
        predict.write_atomic(output_path, lines)
    else:
        sys.stdout.write(lines)
        sys.stdout.flush()
