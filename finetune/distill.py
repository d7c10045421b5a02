"""Knowledge distillation in the fine-tuning run: a smaller student learns from a teacher.

`distill.teacher` names a finished fine-tuning workdir (same task and label set). Before
training, the teacher predicts every training example once, in eval mode, through its own
tokenizer and seq_len; those logits ride along in the encoded training set as
'teacher_logits', so batches, data order, resume and sharding are exactly those of an
ordinary run, and the train step needs no teacher on the mesh. The student's loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(labels)

(Hinton et al. 2015; T^2 keeps the soft term's gradient scale independent of T).
Token augmentation (augment.*) would change the text after the teacher has seen it, so it
cannot be combined with a teacher.

`distill.student_layers` = k > 0 (with or without a teacher) builds the student with k
encoder layers of init_from's L: student layer i starts from pretrained layer i*L//k, i.e.
every (L/k)-th layer from the bottom as DistilBERT did (6 of 12: layers 0, 2, ..., 10),
so the student spans the pretrained depth; for 1 of 2 it is the bottom layer, the only one
that was trained on the embeddings' output. Embeddings come along unchanged.

results.json of a distilled run gets a 'distill' record: both models' sizes, the teacher's
own results, and the prediction throughput (examples/s) of both, measured in this process
on the same examples.
"""

import hashlib
import io
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from engine.errors import ConfigError
from engine.paths import absolute_path, write_bytes_atomic
from engine.rundir import RunDir
from finetune import data, encoding, predict
from finetune.task import load_config_task
from models.flops import count_params

SPEED_MAX_EXAMPLES = 4096  # examples timed per model and repeat
SPEED_REPEATS = 3  # alternating teacher / student; the best repeat counts
CACHE_FILENAME = 'teacher_logits.npz'  # in the student's workdir, reused on resume


def _section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    return cfg.get('distill')


def enabled(cfg: ml_collections.ConfigDict) -> bool:
    """Whether a teacher is set (its soft targets enter the loss)."""
    section = _section(cfg)
    return bool(section is not None and section.teacher)


def loss_settings(cfg: ml_collections.ConfigDict) -> tuple[float, float] | None:
    """(temperature, alpha) for the train step, or None without a teacher."""
    if not enabled(cfg):
        return None
    return float(cfg.distill.temperature), float(cfg.distill.alpha)


# ---------------------------------------------------------------- the loss


def distillation_losses(student_logits: jax.Array, teacher_logits: jax.Array,
                        labels: jax.Array, temperature: float, alpha: float) -> jax.Array:
    """Per-example alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE."""
    t = temperature
    teacher_log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / t, axis=-1)
    student_log_p = jax.nn.log_softmax(student_logits / t, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels)
    return alpha * t * t * kl + (1.0 - alpha) * ce


# ---------------------------------------------------------------- the student's layers


def _student_layers(cfg: ml_collections.ConfigDict) -> int:
    section = _section(cfg)
    return 0 if section is None else int(section.student_layers)


def model_fields(cfg: ml_collections.ConfigDict, pretrained_layers: int) -> dict:
    """BertConfig fields of the student: {'num_layers': k}, or {} when student_layers=0."""
    k = _student_layers(cfg)
    if k < 0:
        raise ConfigError(f'distill.student_layers: must be >= 0, got {k}')
    if k > pretrained_layers:
        raise ConfigError(f'distill.student_layers: {k} is more than the {pretrained_layers} '
                          'encoder layers of the model')
    return {'num_layers': k} if k else {}


def layer_sources(student_layers: int, pretrained_layers: int) -> list[int]:
    """The pretrained layer each student layer starts from: i * L // k (DistilBERT's
    every other layer for k = L / 2)."""
    return [i * pretrained_layers // student_layers for i in range(student_layers)]


def _pretrained_layers(cfg: ml_collections.ConfigDict) -> int:
    """Encoder layers of init_from's model (of `model` for init_from=none)."""
    if cfg.init_from.lower() == 'none':
        return int(cfg.model.num_layers)
    return int(RunDir(cfg.init_from).read_config()['model']['num_layers'])


def source_names(cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """{student layer name: pretrained layer name} where they differ (empty when
    student_layers is 0 or keeps every layer)."""
    k = _student_layers(cfg)
    if not k:
        return {}
    return {f'layer_{i}': f'layer_{j}'
            for i, j in enumerate(layer_sources(k, _pretrained_layers(cfg))) if i != j}


# ---------------------------------------------------------------- the teacher


def check(cfg: ml_collections.ConfigDict, task: dict) -> None:
    """One-line ConfigErrors for a student or teacher that cannot work (init_from has
    been checked already)."""
    model_fields(cfg, _pretrained_layers(cfg))
    if not enabled(cfg):
        return
    d = cfg.distill
    if not d.temperature > 0:
        raise ConfigError(f'distill.temperature: must be > 0, got {d.temperature}')
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f'distill.alpha: must be in [0, 1], got {d.alpha}')
    if cfg.task == 'regression':
        raise ConfigError('distill.teacher: regression is not supported (soft targets need '
                          'class logits)')
    augment = cfg.get('augment')
    if augment is not None and any(float(augment[k]) for k in ('delete', 'swap', 'mask')):
        raise ConfigError('distill.teacher: cannot be combined with augment.* (the teacher\'s '
                          'logits are computed once on the unaugmented text)')
    root = absolute_path(d.teacher)
    if not root.is_dir():
        raise ConfigError(f'distill.teacher: no such directory {str(root)!r}')
    predict.check_finished_run(root, 'distill.teacher')
    theirs = RunDir(root).read_task()
    if theirs['task'] != cfg.task or list(theirs['label_names']) != list(task['label_names']):
        raise ConfigError(f'distill.teacher: it was trained for {theirs["task"]} with labels '
                          f'{theirs["label_names"]}, this run is {cfg.task} with labels '
                          f'{task["label_names"]}')


def teacher_logits(model, params, encoded: dict[str, np.ndarray]) -> np.ndarray:
    """float32 (N, C) eval-mode logits of every encoded example, in order."""
    logits = predict.all_logits(model, jax.device_put(params), encoded, 'teacher logits')
    return logits.astype(np.float32)


def with_teacher_logits(cfg: ml_collections.ConfigDict, encoded: dict[str, np.ndarray],
                        examples: data.Examples, workdir: epath.Path | None = None
                        ) -> dict[str, np.ndarray]:
    """`encoded` (the training split) plus the teacher's 'teacher_logits' (unchanged
    without a teacher). With `workdir` they are kept in WORKDIR/teacher_logits.npz, so a
    resumed run reuses them while the teacher and the examples are the same."""
    if not enabled(cfg):
        return encoded
    root = absolute_path(cfg.distill.teacher)
    run_cfg = RunDir(root).read_config()
    inputs = predict.encode_for_run(run_cfg, root, examples)
    key = _cache_key(root, inputs)
    cache = workdir / CACHE_FILENAME if workdir is not None else None
    logits = _read_cache(cache, key)
    if logits is None:
        _, model, params, _ = predict.load_run(root)
        start = time.perf_counter()
        logits = teacher_logits(model, params, inputs)
        if jax.process_index() == 0:
            print(f'distill: teacher logits of {len(logits):,} training examples in '
                  f'{time.perf_counter() - start:.1f}s', flush=True)
            if cache is not None:
                buffer = io.BytesIO()
                np.savez(buffer, key=np.array(key), logits=logits)
                write_bytes_atomic(cache, buffer.getvalue())
    elif jax.process_index() == 0:
        print(f'distill: teacher logits read from {cache}', flush=True)
    return {**encoded, 'teacher_logits': logits}


def _cache_key(teacher: epath.Path, inputs: dict[str, np.ndarray]) -> str:
    """Names the teacher (its config, model and best checkpoint's step) and the exact
    inputs it sees (its tokenization of the examples)."""
    h = hashlib.sha256()
    run = RunDir(teacher)
    for path in (run.config_file, run.model_config_file):
        h.update(path.read_bytes())
    h.update(str(run.best_steps()).encode())
    for name in sorted(inputs):
        h.update(name.encode() + np.ascontiguousarray(inputs[name]).tobytes())
    return h.hexdigest()


def _read_cache(cache: epath.Path | None, key: str) -> np.ndarray | None:
    if cache is None or not cache.exists():
        return None
    with np.load(io.BytesIO(cache.read_bytes())) as saved:
        return saved['logits'] if str(saved['key']) == key else None


# ---------------------------------------------------------------- size and speed


def examples_per_second(runs: list[tuple], repeats: int = SPEED_REPEATS) -> list[float]:
    """Prediction throughput of each (model, params, encoded): every model runs all its
    batches once per repeat, models alternating (so load on the machine hits all alike);
    the best repeat counts. Compilation is excluded."""
    prepared = []
    for model, params, encoded in runs:
        apply = predict.logits_fn(model)
        batches = [jax.device_put(b) for b in encoding.eval_batches(encoded, predict.BATCH_SIZE)]
        params = jax.device_put(params)
        jax.block_until_ready(apply(params, batches[0]))  # compile
        prepared.append((apply, params, batches, len(encoded['input_ids'])))
    best = [float('inf')] * len(runs)
    for _ in range(repeats):
        for i, (apply, params, batches, _) in enumerate(prepared):
            start = time.perf_counter()
            jax.block_until_ready([apply(params, b) for b in batches])
            best[i] = min(best[i], time.perf_counter() - start)
    return [p[3] / seconds for p, seconds in zip(prepared, best, strict=True)]


def _head(examples: data.Examples, n: int = SPEED_MAX_EXAMPLES) -> data.Examples:
    return data.Examples(text_a=examples.text_a[:n], labels=examples.labels[:n],
                         text_b=None if examples.text_b is None else examples.text_b[:n])


def report(cfg: ml_collections.ConfigDict, workdir: epath.Path, task: dict) -> dict:
    """The 'distill' record of results.json: sizes, the teacher's results, and the
    throughput of both best checkpoints on (up to SPEED_MAX_EXAMPLES) test examples
    (validation without a test split)."""
    teacher_dir = absolute_path(cfg.distill.teacher)
    runs = {name: predict.load_run(root) for name, root in
            (('student', workdir), ('teacher', teacher_dir))}
    split = 'test' if task.get('test') is not None else 'validation'
    examples = _head(task[split])
    n = len(examples)
    speeds = examples_per_second([
        (model, params, predict.encode_for_run(run_cfg, root, examples))
        for (run_cfg, model, params, _), root in zip(runs.values(), (workdir, teacher_dir),
                                                      strict=True)])
    teacher_results = RunDir(teacher_dir).read_results() or {}
    record = {'teacher': str(teacher_dir), 'temperature': float(cfg.distill.temperature),
              'alpha': float(cfg.distill.alpha)}
    for name, (_, model, params, _) in runs.items():
        record[f'{name}_layers'] = model.config.num_layers
        record[f'{name}_params'] = count_params(params)
    record['teacher_results'] = {k: teacher_results[k] for k in ('validation', 'test')
                                 if k in teacher_results}
    record.update({'speed_split': split, 'speed_examples': n,
                   'student_examples_per_sec': round(speeds[0], 1),
                   'teacher_examples_per_sec': round(speeds[1], 1),
                   'speedup': round(speeds[0] / speeds[1], 3)})
    print(f"distill: student {record['student_params']:,} params, {speeds[0]:,.0f} "
          f"examples/s; teacher {record['teacher_params']:,} params, {speeds[1]:,.0f} "
          f'examples/s ({n} {split} examples, best of {SPEED_REPEATS})', flush=True)
    return record


def _speed_main(workdirs: list[str], repeats: int = 5) -> None:
    """Prints each fine-tuning workdir's size, test metrics and prediction examples/s on
    (up to SPEED_MAX_EXAMPLES of) the first run's test split (validation without one), all
    timed in this process."""
    roots = [absolute_path(w) for w in workdirs]
    runs = [predict.load_run(root) for root in roots]
    task = load_config_task(runs[0][0])
    examples = _head(task['test'] if task.get('test') is not None else task['validation'])
    speeds = examples_per_second([(model, params,
                                   predict.encode_for_run(run_cfg, root, examples))
                                  for root, (run_cfg, model, params, _) in zip(roots, runs,
                                                                                strict=True)],
                                 repeats)
    for root, (_, model, params, _), speed in zip(roots, runs, speeds, strict=True):
        results = (RunDir(root).read_results() or {}).get('test', {})
        print(f'{root}: layers={model.config.num_layers}, {count_params(params):,} params, '
              f"test accuracy {results.get('accuracy', float('nan')):.4f}, "
              f"F1 {results.get('f1', float('nan')):.4f}, {speed:,.0f} examples/s", flush=True)


if __name__ == '__main__':  # python -m finetune.distill WORKDIR [WORKDIR ...]
    import sys
    _speed_main(sys.argv[1:])
