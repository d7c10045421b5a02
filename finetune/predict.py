"""`launch.py predict`: class probabilities of a fine-tuned run's best checkpoint, as JSONL.

Input: a text file (one text a line; `-` for standard input), or CSV/TSV/JSONL with the
run's text column(s).
Output: one JSON object per input row: {"text", ["text_b"], "label", "probabilities"}
(or {"text", "prediction"} for regression), to stdout or --output.

Batches are padded as the run's data.dynamic_padding says (on for runs that predate it):
each cut to its longest row's bucket length (finetune/data.py), so at most
log2(seq_len / 16) + 1 shapes compile; padding is masked, so only the work changes.
"""

import json
import os
import pathlib
import sys

import jax
import numpy as np
from etils import epath

from engine.checkpoint import read_state_numpy
from engine.config_cli import read_run_config
from engine.errors import ConfigError
from engine.paths import absolute_path, local_file_argument
from engine.progress import Progress
from engine.rundir import SPM_FILENAME, RunDir
from finetune import data, encoding, span_tasks
from models.bert import BertForSequenceClassification
from models.config import model_config
from models.peft import merge_lora, merged_config
from text.tokenizer import load_tokenizer

BATCH_SIZE = 64


def read_inputs(path: str, cfg) -> tuple[list[str], list[str] | None]:
    """Texts (and second texts for pair tasks) from a .txt, .csv, .tsv or .jsonl file, or
    from standard input (`-`, one text a line). A one-line ConfigError if there are none."""
    if path == '-':
        return _text_lines(_read_stdin(), 'standard input'), None
    file = epath.Path(path)
    if file.is_dir():
        raise ConfigError(f'--input: {path} is a directory, not a file')
    if not file.is_file():
        raise ConfigError(f'--input: no such file {path!r}')
    raw = file.read_bytes()
    if file.suffix in ('.csv', '.tsv', '.jsonl', '.json'):
        _check_not_binary(raw, path)
        try:
            rows = data.read_examples(path, text_column=cfg.data.text_column,
                                      text_b_column=cfg.data.text_b_column,
                                      label_column='', task=cfg.task)
        except ValueError as e:  # names the file and line: no rows, a bad row, not UTF-8
            raise ConfigError(f'--input: {e}') from None
        texts_b = [r['text_b'] for r in rows] if cfg.data.text_b_column else None
        return [r['text_a'] for r in rows], texts_b
    return _text_lines(raw, path), None


def _read_stdin() -> bytes:
    stream = getattr(sys.stdin, 'buffer', None)  # bytes: decoded (and refused) below
    if stream is not None:
        return stream.read()
    return sys.stdin.read().encode('utf-8', 'surrogateescape')


def _check_not_binary(raw: bytes, name: str) -> None:
    if b'\0' in raw:
        line = raw.count(b'\n', 0, raw.index(b'\0')) + 1
        raise ConfigError(f'--input: {name} looks binary (a NUL byte on line {line}); '
                          'expected UTF-8 text')


def _text_lines(raw: bytes, name: str) -> list[str]:
    """The non-blank lines of a UTF-8 text, stripped."""
    _check_not_binary(raw, name)
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = raw.count(b'\n', 0, e.start) + 1
        raise ConfigError(f'--input: {name}, line {line}: not valid UTF-8 (byte '
                          f'{raw[e.start]:#04x})') from None
    lines = [line.strip() for line in text.splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise ConfigError(f'--input: {name} has no text to predict (empty or blank lines '
                          'only; expected one text a line)')
    return texts


def check_output(output_path: str, input_path: str = '') -> None:
    """A one-line ConfigError, before any work, unless --output can be written as a file."""
    out = pathlib.Path(output_path).absolute()
    if out.is_dir():
        raise ConfigError(f'--output: {output_path} is a directory; give a file path')
    if not out.parent.is_dir():
        raise ConfigError(f'--output: the folder {str(out.parent)!r} does not exist')
    if input_path and input_path != '-' and out == pathlib.Path(input_path).absolute():
        raise ConfigError(f'--output: {output_path} is the --input file')


def _write_atomic(path: str, text: str) -> None:
    """Writes `path` whole or not at all: a file beside it, renamed over it."""
    target = pathlib.Path(path).absolute()
    tmp = target.parent / f'.{target.name}.tmp-{os.getpid()}'
    try:
        tmp.write_text(text, encoding='utf-8')
        os.replace(tmp, target)
    except OSError as e:
        raise ConfigError(f'--output: cannot write {path} ({type(e).__name__}: '
                          f'{e.strerror or e})') from None
    finally:
        tmp.unlink(missing_ok=True)


write_atomic = _write_atomic  # finetune/span_predict.py writes its output the same way


def check_finished_run(workdir: epath.Path, key: str = '--workdir') -> None:
    """A one-line ConfigError naming `key` unless `workdir` holds what `load_run` reads."""
    run = RunDir(workdir)
    for path in (run.config_file, run.model_config_file, run.task_file, run.best):
        if not path.exists():
            raise ConfigError(f'{key}: {workdir} has no {path.name}; is it a finished '
                              'fine-tuning run?')
    if not run.best_steps():
        raise ConfigError(f'{key}: {run.best} holds no checkpoint; is it a finished '
                          'fine-tuning run?')
    if run.tokenizer_file() is None:
        raise ConfigError(f'{key}: {workdir} has no {SPM_FILENAME}; is it a finished '
                          'fine-tuning run?')


def load_run(workdir: epath.Path):
    """(config, model, params, label names) of a fine-tuning workdir's best checkpoint."""
    check_finished_run(workdir)
    run = RunDir(workdir)
    cfg = read_run_config(workdir)
    model_cfg = model_config(run.read_model_config())
    try:
        params = read_state_numpy(str(run.best))['params']
    except FileNotFoundError as e:
        raise ConfigError(f'--workdir: {e}') from None
    # LoRA folds into the kernels: the plain architecture (plus any adapters) predicts alike.
    params, model_cfg = merge_lora(params, model_cfg), merged_config(model_cfg)
    model = (span_tasks.model_class(cfg.task)(model_cfg) if span_tasks.handles(cfg.task)
             else BertForSequenceClassification(model_cfg))
    label_names = run.read_task()['label_names']
    return cfg, model, params, label_names


def encode_for_run(run_cfg, workdir: epath.Path, examples: data.Examples) -> dict:
    """`examples` encoded as the run in `workdir` saw its inputs: its tokenizer, seq_len."""
    return encoding.encode(load_tokenizer(RunDir(workdir).tokenizer_file()), examples,
                       run_cfg['seq_len'])


def logits_fn(model):
    """jitted (params, eval batch) -> eval-mode logits."""
    return jax.jit(lambda p, b: model.apply({'params': p}, b['input_ids'],
                                            token_type_ids=b['token_type_ids'],
                                            attention_mask=b['attention_mask']))


def all_logits(model, params, encoded: dict, label: str = 'predict', *,
               dynamic_padding: bool = True) -> np.ndarray:
    """Eval-mode logits (N, C) of every encoded example, in order; a progress line
    (examples/s, ETA) shows while it runs long. `dynamic_padding`: each batch cut to its
    bucket length (the same logits, up to float rounding, for less work)."""
    apply = logits_fn(model)
    total = len(encoded['input_ids'])
    outputs, done = [], [0]
    with Progress(label, total, lambda: (done[0], 0), unit='examples', scale=1):
        for batch in encoding.eval_batches(encoded, BATCH_SIZE, dynamic_padding=dynamic_padding):
            outputs.append(np.asarray(apply(params, batch))[batch['weights'] > 0])
            done[0] += len(outputs[-1])
    return np.concatenate(outputs)


def predict(model, params, encoded: dict, task: str, *, dynamic_padding: bool = True
            ) -> np.ndarray:
    """Probabilities (N, C), or regression outputs (N,), in input order."""
    logits = all_logits(model, params, encoded, dynamic_padding=dynamic_padding)
    return logits[:, 0] if task == 'regression' else _softmax(logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def run(workdir: str, input_path: str, output_path: str = '') -> None:
    local_file_argument(input_path, '--input', 'predict')
    if output_path:
        local_file_argument(output_path, '--output', 'predict')
        check_output(output_path, input_path)
    workdir = absolute_path(workdir)
    check_finished_run(workdir)
    if RunDir(workdir).read_task().get('task') == 'embedding':
        raise ConfigError(f'--workdir: {workdir} is an embedding run (no classes to '
                          'predict); write its vectors with launch.py embed')
    # The inputs are read (and refused) before the checkpoint is loaded.
    texts, texts_b = read_inputs(input_path, read_run_config(workdir))
    cfg, model, params, label_names = load_run(workdir)
    examples = data.Examples(text_a=texts, text_b=texts_b,
                             labels=np.zeros(len(texts), np.float32 if cfg.task == 'regression'
                                             else np.int32))
    encoded = encode_for_run(cfg, workdir, examples)
    outputs = predict(model, params, encoded, cfg.task,
                      dynamic_padding=bool(cfg.data.get('dynamic_padding', True)))
    lines = []
    for i, text in enumerate(texts):
        record = {'text': text}
        if texts_b is not None:
            record['text_b'] = texts_b[i]
        if cfg.task == 'regression':
            record['prediction'] = float(outputs[i])
        else:
            record['label'] = label_names[int(outputs[i].argmax())]
            record['probabilities'] = {n: round(float(p), 6)
                                       for n, p in zip(label_names, outputs[i], strict=True)}
        lines.append(json.dumps(record) + '\n')
    if output_path:
        _write_atomic(output_path, ''.join(lines))
    else:
        sys.stdout.write(''.join(lines))
        sys.stdout.flush()
