"""Masked-LM pretraining entry: `run(config, workdir)`.

Order matters for users: the config is validated completely (files, mesh, divisibility)
before anything is written, then tokenizer -> data -> sharded state (fresh or restored)
-> the shared loop.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from engine import distributed, resume_check
from engine import mesh as mesh_lib
from engine.budget import Budget
from engine.checkpoint import Checkpoints
from engine.errors import ConfigError
from engine.lock import workdir_lock
from engine.loop import LoopCallbacks
from engine.paths import check_reachable, open_workdir
from engine.run import Run, RunSettings, run_stage
from engine.rundir import tokenized_data_dir
from models.flops import count_params
from pretrain import continual, data, objective, phases, small_corpus
from pretrain import state as state_lib
from pretrain.sections import (
    check_plan_resume,
    final_config,
    masking_config,
    step_plan,
    step_spec,
    validate,
    validate_values,
    with_seq_len,
)
from text.batches import PretrainBatches, eval_batches
from text.tokenizer import Tokenizer, load_or_train_tokenizer


def prepare_data(cfg, workdir: epath.Path, sources: list[data.Source], src=None,
                 show_progress: bool = True, beam_options: list[str] | None = None
                 ) -> tuple[Tokenizer, list[str]]:
    """The run's tokenizer (trained once on a sample of the corpus, then reused) and each
    source's prepared directory (prepared once, shared by the processes)."""
    with distributed.main_first('data'):
        continual.copy_tokenizer(cfg, src, workdir)
        tokenizer = load_or_train_tokenizer(
            str(workdir), lambda: data.tokenizer_sample(cfg, sources), cfg.model.vocab_size,
            cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f'model.vocab_size: {cfg.model.vocab_size} is smaller than the '
                          f'tokenizer vocabulary ({tokenizer.vocab_size})')
    root = tokenized_data_dir(cfg.data.data_dir, workdir)
    specs = [data.prepare_spec(cfg, s.train, s.eval) for s in sources]
    if beam_options is not None:
        from text import beam_prepare  # an optional extra
        return tokenizer, [beam_prepare.run(spec, tokenizer, root, beam_options)[0]
                           for spec in specs]
    directories = [data.prepare_source(spec, tokenizer, root, cfg.data.workers, show_progress)
                   for spec in specs]
    return tokenizer, directories


def _build_state(cfg, mesh, built: state_lib.PretrainState, ckpts: Checkpoints, src=None,
                 tokenizer=None):
    """Sharded fresh init (init_from's weights for a continual run), or the latest
    checkpoint restored onto this mesh."""
    abstract, shardings = built.abstract, built.shardings
    with mesh_lib.sharding_context(mesh, cfg.mesh.rules):
        latest = ckpts.latest_step()
        if latest is None and src is not None:
            state = continual.initial_state(cfg, src, tokenizer, built.tx, abstract, shardings,
                                            mesh)
            return state, shardings, 0
        if latest is None:
            return state_lib.fresh_state(built), shardings, 0
    # The newest one that restores: a damaged newer one is moved aside, with one line.
    latest, state, meta = ckpts.restore_latest(abstract, shardings)
    _check_resume(cfg, meta)
    return state, shardings, latest


def _check_resume(cfg, meta: dict) -> None:
    saved = meta.get('data', {})
    if saved.get('position') == 0:  # an imported checkpoint: no data consumed yet
        return
    check_plan_resume(cfg, meta.get('config') or {})
    if saved.get('seed') != cfg.seed or saved.get('batch_size') != cfg.batch_size:
        raise ConfigError(
            f'seed/batch_size: the checkpoint was made with seed={saved.get("seed")}, '
            f'batch_size={saved.get("batch_size")}; resuming with other values would not '
            'replay the same data. Use a new --workdir to change them.')


def _evaluator(cfg, mesh, eval_fn, eval_source):
    """Held-out MLM loss and accuracy over (at most eval_max_batches of) the eval split;
    this process reads only its rows, once (they are kept for the next evals)."""
    batches = list(eval_batches(eval_source, cfg.batch_size, *mesh_lib.data_shard(
        cfg.batch_size, mesh), max_batches=cfg.eval_max_batches))

    def evaluate(state) -> dict:
        totals = []
        for index, local in enumerate(batches):
            totals.append(eval_fn(state.params, mesh_lib.shard_batch(local, mesh),
                                  jnp.int32(index)))
        sums = jax.device_get(totals)
        weight = max(sum(float(t['weight_sum']) for t in sums), 1.0)
        return {'eval_loss': sum(float(t['loss_sum']) for t in sums) / weight,
                'eval_mlm_accuracy': sum(float(t['correct_sum']) for t in sums) / weight,
                **objective.extra_eval_metrics(sums)}
    return evaluate


def _prepare_all_data(cfg, workdir: epath.Path, sources: list, src, main: bool):
    """Tokenizer, train splits and eval source, and (continual runs) the old text's eval
    source."""
    start = time.time()
    tokenizer, directories = prepare_data(cfg, workdir, sources, src, show_progress=main)
    train, evals = data.open_splits(directories, [s.weight for s in sources],
                                    cfg.data.cache_mb, cfg.data.read_block)
    old_eval = continual.old_eval_source(cfg, src, tokenizer,
                                         tokenized_data_dir(cfg.data.data_dir, workdir))
    _log(main, f'data: {sum(len(t) for t in train):,} train / {len(evals):,} eval sequences '
               f'of {cfg.seq_len} tokens, vocab {tokenizer.vocab_size} '
               f'({time.time() - start:.1f}s)')
    return tokenizer, (train, evals), old_eval


def _evaluate_both(cfg, mesh, eval_fn, eval_source, old_source, results: dict):
    """evaluate(state) -> the held-out metrics, plus old_* ones on a continual run's old
    text (forgetting); `results` keeps the latest of each."""
    evaluator = _evaluator(cfg, mesh, eval_fn, eval_source)
    old_evaluator = old_source is not None and _evaluator(cfg, mesh, eval_fn, old_source)

    def evaluate(state):
        results.update(evaluator(state))
        if old_evaluator:
            results.update({f'old_{k}': v for k, v in old_evaluator(state).items()})
        return dict(results)
    return evaluate


def _small_corpus(cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """A small corpus of the user's continues the general encoder (the cache's is built
    first, by this same `run`, when missing); anything else is `cfg` as given."""
    check_reachable(workdir)  # it reads the workdir's saved choice: gs:// without network is
    # one line now, not a minute of retries
    def build(encoder_cfg, encoder_workdir: str) -> None:
        validate_values(cfg)  # a bad key of the user's is one line before, not after, 25 min
        run(encoder_cfg, encoder_workdir)
    return small_corpus.resolve(cfg, workdir, build,
                                lambda line: _log(jax.process_index() == 0, line))


def prepare_only(cfg: ml_collections.ConfigDict, workdir: str,
                 beam_options: list[str] | None = None) -> list[str]:
    """`launch.py prepare`: the tokenizer and the prepared corpus, nothing else; the
    directories (a later `pretrain` with the same config and workdir finds them).
    beam_options (a list, possibly empty): prepare with Apache Beam and these options."""
    cfg = _small_corpus(cfg, workdir)
    cfg, src = continual.resolve(cfg)
    cfg = final_config(cfg)  # seq_len_phases: the last phase's length
    validate_values(cfg)
    sources = data.resolve_sources(cfg)
    if beam_options is not None:
        from text.beam_prepare import require_beam
        require_beam()  # before the tokenizer is trained
    workdir = open_workdir(workdir)
    main = jax.process_index() == 0
    with workdir_lock(workdir, 'prepare'):
        _, directories = prepare_data(cfg, workdir, sources, src, show_progress=main,
                                      beam_options=beam_options)
        for length in {p.seq_len for p in step_plan(cfg).phases} - {cfg.seq_len}:
            directories += prepare_data(with_seq_len(cfg, length), workdir, sources,
                                        src, show_progress=main, beam_options=beam_options)[1]
    for source, directory in zip(sources * (len(directories) // len(sources)), directories,
                                 strict=True):  # seq_len_phases: one set per length
        _log(main, f'{source.name}: {data.describe(directory)}')
    return directories


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrains (or resumes) in `workdir`; returns the final eval metrics."""
    cfg = _small_corpus(cfg, workdir)
    cfg, src = continual.resolve(cfg)  # init_from: its architecture becomes this run's
    cfg = final_config(cfg)  # seq_len_phases: the last phase's length
    mesh, sources = validate(cfg)
    settings = RunSettings.from_config('pretrain', cfg)  # profile/W&B: one line, before work
    started = time.time()
    return run_stage(settings, workdir,
                     lambda run: _pretrain(cfg, run, src, mesh, sources, started))


def _pretrain(cfg, run: Run, src, mesh, sources: list, started: float) -> dict:
    """The run itself, with the workdir held."""
    workdir, main = run.workdir, run.main
    saved = resume_check.check_pretrain(cfg.to_dict(), workdir)  # a resume: before writing
    if saved is not None:
        check_plan_resume(cfg, saved)
    tokenizer, splits, old_eval = _prepare_all_data(cfg, workdir, sources, src, main)
    if main:  # after the data: a bad vocabulary size or input leaves no config behind
        run.rundir.write_config(cfg.to_dict())
    spec = step_spec(cfg)
    built = state_lib.build(spec, mesh)  # the same state/step as the dry runs'
    ckpts = run.checkpoints(run.rundir.checkpoints, keep=cfg.keep_checkpoints)
    state, shardings, start_step = _build_state(cfg, mesh, built, ckpts, src, tokenizer)
    resumed_meta = ckpts.restore_meta(start_step) if start_step else None
    plan = step_plan(cfg)
    budget = Budget.resume(cfg, resumed_meta, start_step, cfg.batch_size * cfg.seq_len, started,
                           plan.tokens_at if plan.active else None)
    # Batches skipped by NaN rollbacks: data position - step (0 in checkpoints before them;
    # an imported checkpoint's position is 0). A rollback changes it (the loop's own count).
    position = (resumed_meta or {}).get('data', {}).get('position') or start_step
    skipped = {'offset': position - start_step}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    masking = masking_config(cfg, tokenizer.vocab_size)
    word_starts = jnp.asarray(tokenizer.word_start_mask()) if masking.whole_word else None
    with mesh_lib.sharding_context(mesh, cfg.mesh.rules):
        train_fn, eval_fn = state_lib.compile_steps(spec, mesh, built, masking, word_starts)
        train_fns = _phase_steps(cfg, spec, plan, mesh, built, tokenizer, word_starts,
                                 {cfg.seq_len: train_fn})
    flops = state_lib.flops_per_step(spec, built, masking.max_predictions)
    restored = ckpts.latest_step()  # 0 for an imported checkpoint (`launch.py import`)
    origin = (f'resuming from step {restored}' if restored is not None
              else 'starting from init_from' if src else 'fresh start')
    _log(main, f'model: {count_params(state.params) / 1e6:.2f}M params, mesh '
               f'{dict(mesh.shape)}, {flops / 1e9:.1f} GFLOPs/step, {origin}')
    train_splits, eval_source = splits
    weights = [s.weight for s in sources] if len(sources) > 1 else None
    batches = PretrainBatches(train_splits, cfg.batch_size, cfg.seed,
                              *mesh_lib.data_shard(cfg.batch_size, mesh), weights=weights,
                              read_block=cfg.data.read_block)
    phase_splits = plan.active and _phase_splits(cfg, plan, workdir, sources, src, main,
                                                 train_splits, weights)
    iterate = phases.feed(cfg.seed, plan, mesh_lib.data_shard(cfg.batch_size, mesh), batches,
                          phase_splits, weights)
    meta = lambda step: state_lib.checkpoint_meta(  # noqa: E731
        spec, cfg.to_dict(), step + skipped['offset'], budget=budget.meta(step))

    def rollback(step: int, offset: int):  # a NaN loss: back to checkpoint `step`
        ckpts.wait()
        skipped['offset'] = offset  # what later checkpoints record
        return ckpts.restore(step, abstract, shardings)[0], iterate(step + offset, offset)
    writer = run.open_writer(start_step)
    results = {}
    evaluate = _evaluate_both(cfg, mesh, eval_fn, eval_source, old_eval, results)
    if src is not None and start_step == 0:  # before any update: the continual baseline
        with mesh_lib.sharding_context(mesh, cfg.mesh.rules):
            writer.write(0, evaluate(state))
        _log(main, 'step 0: ' + ', '.join(f'{k}={v:.4f}' for k, v in results.items()))

    loop_cfg = run.loop_config(
        num_steps=budget.last_step(cfg.num_train_steps), eval_every=cfg.eval_every_steps,
        checkpoint_every=cfg.checkpoint_every_steps, flops_per_step=flops,
        deadline=budget.deadline(), nan_rollbacks=cfg.nan_rollbacks,
        data_offset=skipped['offset'], tokens_at=budget.tokens_at)
    callbacks = LoopCallbacks(
        step=lambda s, b, *rate: train_fns[phases.seq_len_of(b)](  # rate: schedule=budget's
            s, mesh_lib.shard_batch(b, mesh), *rate), evaluate=evaluate,
        save=lambda step, s: ckpts.save(step, s, meta(step)), write=writer.write,
        check_saves=ckpts.check, rollback=rollback,
        summarize=objective.summarize(spec.objective),
        learning_rate=phases.learning_rates(spec.optimizer, cfg.num_train_steps,
                                            cfg.log_every_steps, budget))
    offset = skipped['offset']
    with mesh_lib.sharding_context(mesh, cfg.mesh.rules):
        run.loop(state, iterate(start_step + offset, offset), start_step, loop_cfg, callbacks)
    return results


def _phase_steps(cfg, spec, plan, mesh, built, tokenizer, word_starts, fns: dict) -> dict:
    """seq_len -> the jitted train step of that phase (its own masking budget)."""
    for length in {p.seq_len for p in plan.phases} - set(fns):
        masking = masking_config(with_seq_len(cfg, length), tokenizer.vocab_size)
        phase = dataclasses.replace(spec, seq_len=length)
        fns[length] = state_lib.compile_steps(phase, mesh, built, masking, word_starts)[0]
    return fns


def _phase_splits(cfg, plan, workdir, sources, src, main, final_splits, weights) -> list:
    """Each phase's train splits (data prepared at its length; the final length's exist)."""
    splits = {cfg.seq_len: final_splits}
    for length in {p.seq_len for p in plan.phases} - set(splits):
        _, directories = prepare_data(with_seq_len(cfg, length), workdir, sources, src,
                                      show_progress=main)
        splits[length] = data.open_splits(directories, weights, cfg.data.cache_mb)[0]
    _log(main, phases.describe(plan))
    return [splits[p.seq_len] for p in plan.phases]


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, flush=True)
