"""Hyper-parameter search: `run(config, workdir)` for `launch.py search` (configs/search.py).

Every trial is an ordinary fine-tuning run in `WORKDIR/trial_N/` (finetune.train.run) of
the `base` config with the trial's sampled values; its score is the validation value of the
config's `metric` (the best checkpoint's, as results.json reports it). optuna samples (TPE
or random, seeded) and prunes: after each validation evaluation the trial reports its
metric, and the median pruner stops it when it is worse than the median of earlier trials
at the same evaluation (the k-th evaluation of a trial, so trials of different batch
sizes compare epoch by epoch; never at the last one, which would save nothing). A pruned
trial, or one whose loss became NaN, is PRUNED and its workdir is left as it stopped.

The study is `WORKDIR/study.db` (SQLite). Re-running the command continues it until
`num_trials` trials are COMPLETE or PRUNED. A trial left RUNNING (the process was killed)
or interrupted (SIGTERM, Ctrl-C) is marked FAIL and queued again with the same parameters;
the retry trains in the first attempt's workdir, so it resumes from its checkpoint (the
pruner counts its evaluations from the resumed one on). A trial that raised any other
error stays FAIL and is not retried. One process per workdir: a second one would take the
first one's running trials for crashed ones.
"""

import csv
import json
import pathlib
import time
from typing import TYPE_CHECKING

import ml_collections
import numpy as np

from engine import extras
from engine.config_cli import config_to_json
from engine.errors import ConfigError, NonFiniteLoss, Preempted
from engine.paths import local_dir
from finetune import metrics
from finetune import train as finetune_train
from studies import search_space, suite

if TYPE_CHECKING:  # optuna is imported only when a search runs
    import optuna

STUDY_NAME = 'search'
# What a study remembers of its config: continuing it with other values would mix trials
# of different searches.
_IDENTITY = ('base', 'init_from', 'space')


def base_config(search: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The fine-tuning config every trial starts from: `base` with `init_from` applied."""
    return suite.task_config(search.base, 'base', f'init_from={search.init_from}')


def trial_config(search: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
    """The full fine-tuning config of a trial with sampled `values` (dotted keys)."""
    cfg = base_config(search)
    search_space.apply_params(cfg, values)
    return cfg


def validate(search: ml_collections.ConfigDict) -> list[search_space.Param]:
    """Checks the search config and its base fine-tuning config; returns the space."""
    if search.sampler not in ('tpe', 'random'):
        raise ConfigError(f"sampler: expected 'tpe' or 'random', got {search.sampler!r}")
    if search.pruner not in ('median', 'none'):
        raise ConfigError(f"pruner: expected 'median' or 'none', got {search.pruner!r}")
    for key in ('num_trials', 'tpe_startup_trials', 'pruner_startup_trials'):
        if search[key] < (1 if key == 'num_trials' else 0):
            raise ConfigError(f'{key}: too small ({search[key]})')
    base = base_config(search)
    params = search_space.parse_space(search.space, base)
    finetune_train.validate(base)
    return params


def _identity(search) -> dict:
    return json.loads(json.dumps({k: search[k].to_dict() if k == 'space' else search[k]
                                  for k in _IDENTITY}))


def _open_study(search, root: pathlib.Path, direction: str):
    optuna = extras.require('optuna', 'launch.py search')
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    storage = f'sqlite:///{root / "study.db"}'
    # Seeded by (seed, trials so far): a continued random search does not redraw its start.
    previous = _count_trials(storage)
    seed = int(np.random.SeedSequence([search.seed, previous]).generate_state(1)[0])
    if search.sampler == 'tpe':
        sampler = optuna.samplers.TPESampler(seed=seed,
                                             n_startup_trials=search.tpe_startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=search.pruner_startup_trials)
              if search.pruner == 'median' else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner,
                                study_name=STUDY_NAME, direction=direction,
                                load_if_exists=True)
    identity = _identity(search)
    if not study.user_attrs:
        study.set_user_attr('config', identity)
    elif study.user_attrs.get('config') != identity:
        raise ConfigError(f'{root / "study.db"} holds a search with another base, init_from '
                          'or space; use a new --workdir')
    return study


def _count_trials(storage: str) -> int:
    optuna = extras.require('optuna', 'launch.py search')
    try:
        return len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
    except KeyError:  # no such study yet
        return 0


def _requeue_interrupted(study) -> None:
    """Marks RUNNING trials FAIL and queues each interrupted trial's parameters again."""
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get('retried_from') for t in trials}
    for t in trials:
        interrupted = t.state == TrialState.RUNNING or (
            t.state == TrialState.FAIL and t.user_attrs.get('interrupted'))
        if not interrupted or t.number in retried:
            continue
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        root_number = t.user_attrs.get('retry_of', t.number)
        print(f'trial {t.number} was interrupted: queued again (trial_{root_number}/ '
              'resumes)', flush=True)
        study.enqueue_trial(t.params, user_attrs={'retry_of': root_number,
                                                  'retried_from': t.number})


def _objective(search, params, root: pathlib.Path, metric: str):
    optuna = extras.require('optuna', 'launch.py search')

    def objective(trial) -> float:
        values = {p.key: p.suggest(trial) for p in params}
        retry_of = trial.user_attrs.get('retry_of')
        run_dir = root / f'trial_{trial.number if retry_of is None else retry_of}'
        if retry_of is None and run_dir.exists():
            raise ConfigError(f'{run_dir} exists but {root / "study.db"} has no trial for '
                              'it; use a new --workdir')
        print(f'trial {trial.number}: {values} -> {run_dir}', flush=True)
        cfg = trial_config(search, values)
        evaluations = []

        def report(step: int, results: dict) -> None:
            evaluations.append(step)
            trial.report(float(results[metric]), len(evaluations))
            # Pruning at the last evaluation (one per epoch unless eval_every_steps is set)
            # saves no training; the trial completes instead. Read here, not before the
            # run: the run has resolved num_epochs=0 (auto) in this cfg by now.
            last = None if cfg.eval_every_steps else cfg.num_epochs
            if len(evaluations) != last and trial.should_prune():
                why = f'{metric}={results[metric]:.4f} at evaluation {len(evaluations)}'
                print(f'trial {trial.number}: pruned ({why}, step {step})', flush=True)
                raise optuna.TrialPruned(why)
        try:
            results = finetune_train.run(cfg, str(run_dir), report=report)
        except NonFiniteLoss as e:  # a diverging learning rate: a (very) bad trial
            trial.set_user_attr('stopped', str(e))
            raise optuna.TrialPruned(str(e)) from None
        except (Preempted, KeyboardInterrupt):
            trial.set_user_attr('interrupted', True)
            raise
        return float(results['validation'][metric])
    return objective


def run(search: ml_collections.ConfigDict, workdir: str) -> 'optuna.Study':
    """Runs (or continues) the search; writes trials.csv and best_config.json."""
    from optuna.trial import TrialState
    params = validate(search)
    metric = base_config(search).metric
    root = local_dir(workdir, 'search')
    root.mkdir(parents=True, exist_ok=True)
    direction = 'maximize' if metrics.METRIC_DIRECTIONS[metric] == 'max' else 'minimize'
    study = _open_study(search, root, direction)
    _requeue_interrupted(study)
    done = len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = max(search.num_trials - done, 0)
    print(f'{done} trials finished, {remaining} to run ({search.sampler} sampler, '
          f'{metric} on validation, {direction})', flush=True)
    start = time.perf_counter()
    try:
        if remaining:
            study.optimize(_objective(search, params, root, metric), n_trials=remaining,
                           callbacks=[lambda s, t: write_outputs(s, search, root, metric)])
    finally:
        write_outputs(study, search, root, metric)
    print(f'{remaining} trials in {time.perf_counter() - start:.0f} s', flush=True)
    print(summary_table(study, metric), flush=True)
    return study


def write_outputs(study: 'optuna.Study', search: ml_collections.ConfigDict,
                  root: pathlib.Path, metric: str) -> None:
    """trials.csv (every trial) and best_config.json (the best complete trial's config)."""
    keys = sorted({k for t in study.trials for k in t.params})
    with open(root / 'trials.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['number', 'state', 'value', 'duration_s', *keys])
        for t in study.trials:
            writer.writerow([t.number, t.state.name, '' if t.value is None else t.value,
                             _duration(t), *(t.params.get(k, '') for k in keys)])
    best = _best(study)
    if best is not None:
        cfg = trial_config(search, best.params)
        (root / 'best_config.json').write_text(config_to_json(cfg) + '\n')


def _best(study):
    from optuna.trial import TrialState
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def _duration(t) -> str:
    return f'{t.duration.total_seconds():.1f}' if t.duration is not None else ''


def summary_table(study: 'optuna.Study', metric: str) -> str:
    """A Markdown table of the trials, the best one marked."""
    best = _best(study)
    keys = sorted({k for t in study.trials for k in t.params})
    lines = [f'| trial | state | {metric} | s | ' + ' | '.join(keys) + ' |',
             '|---:|---|---:|---:|' + '---|' * len(keys)]
    for t in study.trials:
        mark = ' (best)' if best is not None and t.number == best.number else ''
        value = f'{t.value:.4f}' if t.value is not None else ''
        cells = [_format(t.params.get(k, '')) for k in keys]
        lines.append(f'| {t.number}{mark} | {t.state.name} | {value} | {_duration(t)} | '
                     + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def _format(value) -> str:
    return f'{value:.3g}' if isinstance(value, float) else str(value)
