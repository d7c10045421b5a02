"""Fine-tuning entry: `run(config, workdir)`.

Restores only the encoder (`params/bert/{embeddings,encoder}`) of a pretraining run onto
this run's mesh, adds a fresh pooler and classifier, splits parameters into trainable and
frozen, and trains with the same loop as pretraining. Writes the best checkpoint (by
`metric` on validation), `metrics.jsonl`, TensorBoard events and `results.json`.
"""

import copy
import dataclasses
import functools
import json
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from engine import distributed, resume_check
from engine import mesh as mesh_lib
from engine.checkpoint import Checkpoints
from engine.errors import ConfigError
from engine.loop import LoopCallbacks, LoopConfig
from engine.run import Run, RunSettings, check_batch_split, run_mesh, run_stage
from engine.rundir import RunDir
from finetune import augment, contrastive, distill, encoding, metrics, setup, span_tasks, unfreeze
from finetune.best import BestTracker
from finetune.freeze import count_params_by_label, tree_bytes
from finetune.task import load_config_task


def validate(cfg: ml_collections.ConfigDict, devices: list | None = None
             ) -> tuple[ml_collections.ConfigDict, jax.sharding.Mesh, dict]:
    """Checks config, files and data before anything is written; returns (the config with
    its auto values resolved, as config.json records it: a copy; mesh, task).
    `devices`: the mesh's (default this machine's; a dry run's TPU target's)."""
    for key in ('batch_size', 'seq_len', 'log_every_steps'):
        if cfg[key] < 1:
            raise ConfigError(f'{key}: must be >= 1, got {cfg[key]}')
    if cfg.num_epochs < 0:
        raise ConfigError(f'num_epochs: must be >= 1, or 0 for auto; got {cfg.num_epochs}')
    if cfg.metric not in metrics.METRIC_DIRECTIONS:
        raise ConfigError(f'metric: {cfg.metric!r} is not one of '
                          f'{sorted(metrics.METRIC_DIRECTIONS)}')
    setup.optimizer_config(cfg)  # its keys, checked before anything runs
    if cfg.task == 'embedding':
        contrastive.settings(cfg)
    setup.check_init_from(cfg)
    if span_tasks.handles(cfg.task):
        span_tasks.check(cfg)
    cfg = copy.deepcopy(cfg)  # the caller's config stays as given
    cfg.learning_rate = setup.resolved_learning_rate(cfg)  # 0 = auto, by model width
    mesh = run_mesh(cfg.mesh.shape, cfg.mesh.axes, devices=devices)
    check_batch_split(cfg.batch_size, mesh_lib.data_parallel_size(mesh),
                      cfg.get('grad_accum_steps', 1))
    d = cfg.data
    try:
        task = load_config_task(cfg, d.max_train_examples)
        if d.few_shot_k:  # K examples per class (see finetune/augment.py)
            if cfg.task != 'classification':
                raise ValueError('few_shot_k: needs task=classification')
            task['train'] = augment.few_shot(task['train'], d.few_shot_k, cfg.seed)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f'data: {e}') from None
    distill.check(cfg, task)
    cfg.num_epochs = setup.resolved_num_epochs(cfg, len(task['train']))  # 0: by size
    return cfg, mesh, task


def _evaluate_split(cfg, mesh, predict_fn, params, encoded, task,
                    split: str = 'validation') -> dict:
    """Metrics of the current params on one encoded split."""
    if cfg.task == 'embedding':  # retrieval within the split
        return contrastive.evaluate(cfg, mesh, predict_fn, params, encoded)
    if span_tasks.handles(cfg.task):
        return span_tasks.evaluate_split(cfg, mesh, predict_fn, params, encoded,
                                         task[split], task['label_names'])
    lo, hi = mesh_lib.process_rows(cfg.batch_size, mesh)
    outputs, weights = [], []
    for batch in encoding.eval_batches(encoded, cfg.batch_size,
                                   dynamic_padding=cfg.data.dynamic_padding):
        local = {k: batch[k][lo:hi] for k in ('input_ids', 'token_type_ids', 'attention_mask')}
        out = predict_fn(params, mesh_lib.shard_batch(local, mesh))
        outputs.append(np.asarray(jax.device_get(out)))
        weights.append(batch['weights'])
    scores = np.concatenate(outputs)[np.concatenate(weights) > 0]
    labels = encoded['labels']
    if cfg.task == 'regression':
        return metrics.regression_metrics(labels, scores[:, 0])
    return metrics.classification_metrics(labels, scores.argmax(-1), scores.shape[-1])


KEEP_CHECKPOINTS = 2  # an older one to fall back to
# The NaN advice in fine-tuning's own keys (its optimizer keys are top-level).
NAN_HINT = 'Try a lower learning_rate, more warm-up (warmup_fraction) or max_grad_norm.'


def _named_bests(ckpts: Checkpoints) -> dict[int, int]:
    """{checkpoint step: the best step its meta names} of the run's checkpoints on disk (a
    checkpoint whose meta does not read is one a run cannot resume from)."""
    named = {}
    for step in ckpts.all_steps():
        try:
            named[step] = (ckpts.restore_meta(step).get('best') or {}).get('step', 0)
        except Exception:  # damaged: nothing resumes from it
            continue
    return named


def _scalar_metrics(results: dict, prefix: str) -> dict:
    return {f'{prefix}{k}': v for k, v in results.items() if isinstance(v, int | float)}


def _validation_fn(cfg, mesh, predict_fn, encoded: dict, task: dict, tracker, writer,
                   report: Callable[[int, dict], None] | None):
    """evaluate(state) -> eval_* scalars; keeps the best checkpoint, then calls `report`."""
    def evaluate(s) -> dict:
        results = _evaluate_split(cfg, mesh, predict_fn, s.params, encoded, task)
        tracker.update(int(s.step), s, results)
        scalars = _scalar_metrics(results, 'eval_')
        if report is not None:
            try:
                report(int(s.step), results)
            except BaseException:  # stopped here: this evaluation is still logged
                writer.write(int(s.step), scalars)
                raise
        return scalars
    return evaluate


def run(cfg: ml_collections.ConfigDict, workdir: str,
        report: Callable[[int, dict], None] | None = None) -> dict:
    """Fine-tunes (or resumes) in `workdir`; returns the contents of results.json.

    `report(step, validation metrics)` is called after every validation evaluation (a
    search prunes by it); an exception it raises stops the run there, unsaved beyond the
    best checkpoint. Single-process runs only: other processes would not stop with it.
    """
    auto_rate, auto_epochs = not cfg.learning_rate, not cfg.num_epochs
    cfg, mesh, task = validate(cfg)
    if auto_rate and jax.process_index() == 0:
        print(f'learning_rate: {cfg.learning_rate:g} (auto, by model width)', flush=True)
    if auto_epochs and jax.process_index() == 0:
        min_steps = setup.min_steps_for_width(setup.model_width(cfg))
        print(f'num_epochs: {cfg.num_epochs} (auto: at least {min_steps:,} steps '
              f'over {len(task["train"]):,} training examples)', flush=True)
    settings = RunSettings.from_config('finetune', cfg)  # profile/W&B: one line, before work
    return run_stage(settings, workdir, lambda run: _finetune(cfg, run, mesh, task, report),
                     done=_completed)


def _completed(workdir: epath.Path) -> dict | None:
    """results.json of a run that is already complete (nothing more to do), or None."""
    done = RunDir(workdir).read_results()
    if done is not None:
        print(f'{RunDir(workdir).results_file} exists: this run is complete', flush=True)
    return done


def _finetune(cfg, run: Run, mesh, task: dict,
              report: Callable[[int, dict], None] | None) -> dict:
    """The run itself, with the workdir held."""
    workdir, rundir, main = run.workdir, run.rundir, run.main
    with distributed.main_first('prepare'):  # process 0 writes the tokenizer first
        encoded, built = _prepare(cfg, workdir, task, main)
    encoded['train'] = distill.with_teacher_logits(cfg, encoded['train'], task['train'],
                                                   workdir)
    if cfg.task == 'embedding':  # anchors and positives, cut to one length
        batches = contrastive.PairBatches(encoded['train'], cfg.batch_size, cfg.seed,
                                          *mesh_lib.data_shard(cfg.batch_size, mesh),
                                          dynamic_padding=bool(cfg.data.dynamic_padding))
    else:
        batches = augment.task_batches(cfg, encoded['train'],  # augmented if cfg.augment asks
                                       *mesh_lib.data_shard(cfg.batch_size, mesh))
    num_steps = cfg.num_epochs * batches.steps_per_epoch
    ckpts = run.checkpoints(rundir.checkpoints, keep=KEEP_CHECKPOINTS)
    best_ckpts = run.checkpoints(rundir.best, keep=None)  # the tracker prunes it
    every, num_layers = cfg.gradual_unfreeze_steps, built.model_cfg.num_layers
    phase = unfreeze.phase_of_state(ckpts.latest_step() or 0, every, num_layers)
    state, labels, tx, schedule = setup.initial_state(cfg, mesh, built, num_steps, phase)
    _log_sizes(main, state, labels, built)
    state, start_step, meta = setup.resume(cfg, mesh, built, ckpts, state, num_steps, phase)
    if unfreeze.phase_of_state(start_step, every, num_layers) != phase:  # fell back a phase
        phase = unfreeze.phase_of_state(start_step, every, num_layers)
        labels, tx = setup.phase_optimizer(cfg, mesh, built, state.params, num_steps, phase)
    tracker = BestTracker(cfg, best_ckpts, KEEP_CHECKPOINTS, (start_step, meta),
                          _named_bests(ckpts))
    writer = run.open_writer(start_step)
    _, predict_fn = setup.compile_steps(cfg, mesh, built, tx, labels, schedule, state)

    evaluate = _validation_fn(cfg, mesh, predict_fn, encoded['validation'], task, tracker,
                              writer, report)
    callbacks = LoopCallbacks(
        step=None, evaluate=evaluate, write=writer.write, should_stop=tracker.should_stop,
        save=lambda step, s: tracker.save_checkpoint(ckpts, step, s),
        check_saves=ckpts.check)
    loop_cfg = run.loop_config(
        num_steps=num_steps, eval_every=cfg.eval_every_steps or batches.steps_per_epoch,
        checkpoint_every=batches.steps_per_epoch, flops_per_step=built.flops(cfg),
        nan_hint=NAN_HINT)
    with setup.sharding_context(mesh, cfg):
        state = _train_phases(cfg, run, mesh, built, (state, labels, tx, schedule), phase,
                              batches, loop_cfg, callbacks)
    tracker.settle(ckpts)
    results = _final_results(cfg, mesh, predict_fn, state, best_ckpts, tracker, encoded,
                             task, workdir)
    run.close()  # every save finished before the run is marked complete
    if main:
        rundir.write_json(rundir.results_file, results, indent=2)
        shown = ('ndcg@10', 'mrr@10') if cfg.task == 'embedding' else ('accuracy', 'f1')
        print(json.dumps({k: results['test'].get(k) for k in shown}
                         if results.get('test') else results['validation']), flush=True)
    return results


def _train_phases(cfg, run: Run, mesh, built, start, phase: int, batches,
                  loop_cfg: LoopConfig, callbacks: LoopCallbacks):
    """Runs the loop once per gradual-unfreezing phase (once when it is off) up to
    loop_cfg.num_steps; returns the final state. `start` = (state, labels, tx, schedule) of
    phase `phase`, at the step training continues from."""
    state, labels, tx, schedule = start
    start_step, num_steps = int(state.step), loop_cfg.num_steps
    every, num_layers = cfg.gradual_unfreeze_steps, built.model_cfg.num_layers
    main = jax.process_index() == 0
    for next_phase, end in unfreeze.segments(start_step, num_steps, every, num_layers):
        if callbacks.should_stop():  # resumed from the checkpoint patience stopped at
            break
        if next_phase != phase:
            phase = next_phase
            state, labels, tx = setup.enter_phase(cfg, mesh, built, state, num_steps, phase)
            _log_sizes(main, state, labels, built, f'unfreezing phase {phase}: ')
        train_fn, _ = setup.compile_steps(cfg, mesh, built, tx, labels, schedule, state)
        step = lambda s, b, f=train_fn: f(s, mesh_lib.shard_batch(b, mesh))  # noqa: E731
        state = run.loop(state, batches.iterate(int(state.step)), int(state.step),
                         dataclasses.replace(loop_cfg, num_steps=end),
                         dataclasses.replace(callbacks, step=step))
    return state


def _prepare(cfg, workdir: epath.Path, task: dict, main: bool) -> tuple[dict, setup.Built]:
    """Writes the config, tokenizer and what `predict` needs; encodes every split. A resume
    is checked against what the workdir holds first: a refused one writes nothing."""
    workdir.mkdir(parents=True, exist_ok=True)
    rundir = RunDir(workdir)
    resuming = resume_check.check_finetune(cfg.to_dict(), workdir) is not None
    described = {'task': cfg.task, 'label_names': task['label_names']}
    if resuming:
        resume_check.check_file(rundir.task_file, described, workdir, 'data: ')
    tokenizer = setup.tokenizer_for(cfg, workdir, task)
    encode = (functools.partial(span_tasks.encode, cfg, tokenizer,
                                label_names=task['label_names'])
              if span_tasks.handles(cfg.task)
              else functools.partial(contrastive.encode_pairs, tokenizer, seq_len=cfg.seq_len)
              if cfg.task == 'embedding'
              else lambda examples: encoding.encode(tokenizer, examples, cfg.seq_len))
    encoded = {split: encode(examples) for split, examples in task.items()
               if split in ('train', 'validation', 'test') and examples is not None}
    built = setup.build(cfg, task, tokenizer)
    if resuming:
        resume_check.check_file(rundir.model_config_file, dataclasses.asdict(built.model_cfg),
                                workdir, 'model.')
    if main:
        rundir.write_config(cfg.to_dict())
        rundir.write_json(rundir.model_config_file, dataclasses.asdict(built.model_cfg))
        rundir.write_json(rundir.task_file, described)
    return encoded, built


def _final_results(cfg, mesh, predict_fn, state, best_ckpts, tracker, encoded, task,
                   workdir: epath.Path) -> dict:
    """Validation and test metrics of the best checkpoint (and, distilled, the student's
    size and speed against the teacher's)."""
    best = setup.restore_best(best_ckpts, state, tracker.best['step'])
    results = {'best_step': tracker.best['step'], 'metric': cfg.metric,
               'label_names': task['label_names'],
               'validation': _evaluate_split(cfg, mesh, predict_fn, best,
                                             encoded['validation'], task)}
    if 'test' in encoded:
        results['test'] = _evaluate_split(cfg, mesh, predict_fn, best, encoded['test'], task,
                                          'test')
    if distill.enabled(cfg) and jax.process_index() == 0:
        results['distill'] = distill.report(cfg, workdir, task)
    return results


def _log_sizes(main: bool, state, labels, built, prefix: str = '') -> None:
    if not main:
        return
    counts = count_params_by_label(state.params, labels)
    print(f'{prefix}params: {counts["train"]:,} trainable, {counts["frozen"]:,} frozen; '
          f'optimizer state: {tree_bytes(state.opt_state):,} bytes; '
          f'init: {built.source}', flush=True)

