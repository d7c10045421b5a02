"""`launch.py embed`: sentence embeddings of any run's encoder, written as .npy or JSONL.

--workdir: a pretraining run (its latest checkpoint, or --step; the masked mean of the last
hidden states: mean pooling), an embedding run (task=embedding: its best checkpoint and its
pooling), or another fine-tuning run (its best checkpoint's encoder with its model.pooling
of the last hidden states; the classifier's pooler dense + tanh is not applied).
--input: a .txt file (one text a line; blank lines are skipped and counted) or a
CSV/TSV/JSONL file with a --text-column (rows with empty text are skipped and counted).
--output: OUT.npy (float32 (N, H)) with OUT.ids.txt beside it (one id a line: the input
line each text starts on), or OUT.jsonl ({"id", "text", "embedding"} a line).
The forward pass runs in batches (--batch-size, global) on a mesh of every device
(--mesh: the pretraining mesh shape, e.g. '(2,4)'; parameters sharded by the same logical
rules), with a progress line; embeddings are unnormalised (cosine similarity normalises).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from configs.pretrain import mesh_config
from engine import mesh as mesh_lib
from engine.errors import ConfigError
from engine.paths import absolute_path, local_file_argument
from engine.progress import Progress
from engine.rundir import RunDir
from finetune import contrastive, data, encoding, predict
from finetune.saved_run import load_workdir
from models.embedding import BertForSentenceEmbedding
from text.tokenizer import load_tokenizer

OUTPUTS = ('.npy', '.jsonl')


@dataclasses.dataclass(frozen=True)
class Inputs:
    ids: list[str]
    texts: list[str]


def _line_inputs(path: str) -> Inputs:
    raw = pathlib.Path(path).read_bytes()
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = raw.count(b'\n', 0, e.start) + 1
        raise ConfigError(f'--input: {path}, line {line}: not valid UTF-8') from None
    ids, texts = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            ids.append(str(number))
            texts.append(' '.join(line.split()))
    if not texts:
        raise ConfigError(f'--input: {path} has no text (empty or blank lines only)')
    skipped = len(text.splitlines()) - len(texts)
    if skipped:
        print(f'{path}: skipped {skipped} blank line(s)', flush=True)
    return Inputs(ids, texts)


def read_inputs(path: str, text_column: str) -> Inputs:
    """(ids, texts) of --input; a one-line ConfigError for a missing or unreadable file."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f'--input: no such file {path!r}')
    if file.suffix.lower() not in ('.csv', '.tsv', '.jsonl', '.json'):
        return _line_inputs(path)
    try:
        rows = data.read_examples(path, text_column=text_column, label_column='',
                                  skip_empty=True)
    except ValueError as e:  # names the file and line
        raise ConfigError(f'--input: {e}') from None
    return Inputs([str(r['line']) for r in rows], [r['text_a'] for r in rows])


def _write_atomic(path: pathlib.Path, write) -> None:
    """`write(tmp)` then tmp renamed over `path`: the file is whole or absent."""
    tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}{path.suffix}'
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f'--output: cannot write {path} ({e.strerror or e})') from None
    finally:
        tmp.unlink(missing_ok=True)


def check_output(output: str, input_path: str) -> None:
    suffix = pathlib.Path(output).suffix.lower()
    if suffix not in OUTPUTS:
        raise ConfigError(f'--output: {output} must end in .npy (with OUT.ids.txt beside) or '
                          '.jsonl')
    predict.check_output(output, input_path)


def load_encoder(workdir, step: int | None):
    """(embedding model, its params {'bert': ...}, what was loaded, for the log)."""
    run = RunDir(workdir)
    head, model_cfg, params, task, step = load_workdir(workdir, step)
    finetuned = run.task_file.is_file()
    pooling = model_cfg.pooling if finetuned else 'mean'
    model_cfg = dataclasses.replace(model_cfg, pooling=pooling, dropout_rate=0.0,
                                    attention_dropout_rate=0.0)
    encoder = {'bert': {k: params['bert'][k] for k in ('embeddings', 'encoder')}}
    kind = 'fine-tuned' if finetuned else 'pretrained'
    return (BertForSentenceEmbedding(model_cfg), encoder,
            f'{kind} step {step}, {pooling} pooling')


def parse_mesh(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.strip().strip('()[]').split(',') if x.strip())
    except ValueError:
        shape = ()
    if not shape:
        raise ConfigError(f"--mesh: expected a shape like '(-1,)' or '(2,4)', got {text!r}")
    return shape


def embed_all(model, params, encoded: dict, batch_size: int, mesh_shape=(-1,)) -> np.ndarray:
    """(N, H) float32 embeddings of every encoded row, in order, on a mesh of every device."""
    mesh_cfg = mesh_config()
    try:
        mesh = mesh_lib.make_mesh(mesh_shape, mesh_cfg.axes)
    except ValueError as e:
        raise ConfigError(f'--mesh: {e}') from None
    if batch_size % mesh_lib.data_parallel_size(mesh):
        raise ConfigError(f'--batch-size: {batch_size} does not split over the mesh\'s '
                          f'{mesh_lib.data_parallel_size(mesh)} data-parallel devices')
    seq = encoded['input_ids'].shape[1]
    init = functools.partial(model.init, jax.random.key(0), jnp.zeros((1, seq), jnp.int32))
    with mesh_lib.sharding_context(mesh, mesh_cfg.rules):
        _, shardings = mesh_lib.abstract_and_shardings(lambda: init()['params'], mesh,
                                                       mesh_cfg.rules)
        params = jax.device_put(params, shardings)
        apply = jax.jit(functools.partial(contrastive.embed_step, model=model),
                        in_shardings=(shardings, mesh_lib.batch_sharding(mesh)))
        total, done = len(encoded['input_ids']), [0]
        with Progress('embed', total, lambda: (done[0], 0), unit='texts', scale=1):
            def embed(batch):
                out = np.asarray(apply(params, mesh_lib.shard_batch(batch, mesh)))
                done[0] = min(done[0] + len(out), total)
                return out
            return contrastive.embed_encoded(embed, encoded, batch_size)


def write(output: str, inputs: Inputs, vectors: np.ndarray) -> list[str]:
    """Writes --output (and OUT.ids.txt for .npy), each whole or not at all."""
    target = pathlib.Path(output).absolute()
    if target.suffix.lower() == '.jsonl':
        lines = [json.dumps({'id': i, 'text': t, 'embedding': [round(float(x), 7) for x in v]})
                 + '\n' for i, t, v in zip(inputs.ids, inputs.texts, vectors, strict=True)]
        _write_atomic(target, lambda tmp: tmp.write_text(''.join(lines), encoding='utf-8'))
        return [str(target)]
    ids_path = target.with_suffix('.ids.txt')
    _write_atomic(ids_path, lambda tmp: tmp.write_text(''.join(f'{i}\n' for i in inputs.ids)))
    _write_atomic(target, lambda tmp: np.save(tmp, vectors.astype(np.float32)))
    return [str(target), str(ids_path)]


def run(workdir: str, input_path: str, output: str, *, step: int | None = None,
        batch_size: int = 64, text_column: str = 'text', mesh: str = '(-1,)') -> None:
    local_file_argument(input_path, '--input', 'embed')
    local_file_argument(output, '--output', 'embed')
    check_output(output, input_path)
    if batch_size < 1:
        raise ConfigError(f'--batch-size: must be >= 1, got {batch_size}')
    shape = parse_mesh(mesh)
    source = absolute_path(workdir)
    inputs = read_inputs(input_path, text_column)  # refused before any loading
    model, params, what = load_encoder(source, step)
    run_cfg = RunDir(source).read_config()
    seq_len = int(run_cfg.get('seq_len', model.config.max_position_embeddings))
    tokenizer = load_tokenizer(RunDir(source).tokenizer_file())
    examples = data.Examples(inputs.texts, None, np.zeros(len(inputs.texts), np.int32))
    encoded = encoding.encode(tokenizer, examples, seq_len)
    vectors = embed_all(model, params, encoded, batch_size, shape)
    written = write(output, inputs, vectors)
    print(f'embedded {len(inputs.texts)} texts ({what}, seq_len {seq_len}, '
          f'{vectors.shape[1]} dims): {", ".join(written)}', flush=True)
