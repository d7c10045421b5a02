"""Hyper-parameter searches: `get_config(arg)` with arg = SEARCH[,key=value,...].

    python launch.py search --config configs/search.py:demo --workdir runs/search \
        --config.init_from=runs/tiny [--config.sampler=random] [--config.num_trials=8]

runs `num_trials` fine-tuning trials (each an ordinary fine-tuning run in
`WORKDIR/trial_N/`) with the hyper-parameters of `space` drawn by optuna (TPE, or at
random), scores each by the validation `metric` of its fine-tuning config (the test split
never chooses), and writes `WORKDIR/trials.csv` and `WORKDIR/best_config.json`, the best
trial's full fine-tuning config, which runs as is:

    python launch.py finetune --config runs/search/best_config.json --workdir runs/best

The study lives in `WORKDIR/study.db` (SQLite): re-running the command continues it up
to `num_trials` finished (complete or pruned) trials; a trial a crash or SIGTERM cut off
is run again with the same parameters, resuming its workdir's checkpoint.

Searches:
  demo   the shipped sentiment tweets with 1,000 training labels and 3 epochs; learning
         rate, batch size, warm-up, weight decay, dropout and freeze depth; 8 trials of
         about a minute each (less when pruned), 7-8 minutes on 2 shared CPU cores (see
         README for the measured searches).

`base` is 'FINETUNE_CONFIG_ARG key=value ...' (the arg of configs/finetune.py, then
overrides of its keys), the config every trial starts from; `init_from` is applied before
those overrides. A `space` entry maps a dotted fine-tuning key to a spec string (see
studies/search_space.py): 'loguniform(1e-5, 1e-3)', 'uniform(0, 0.2)', 'int(1, 5)',
"choice(16, 32)", "choice('none', 'layers:1', 'encoder')". Add or drop entries from the
command line: `--config.space.num_epochs='int(1, 5)'`, `--config.space.weight_decay=`.
"""

import ml_collections

from configs.pretrain import apply_arg_overrides

SEARCHES = ('demo',)


def get_config(arg: str = 'demo') -> ml_collections.ConfigDict:
    """Returns the search config for `arg` = 'SEARCH[,key=value,...]'."""
    search, *extras = arg.split(',')
    if search not in SEARCHES:
        raise ValueError(f'config arg: unknown search {search!r}; choose from {list(SEARCHES)}')
    c = ml_collections.ConfigDict()
    c.init_from = ''  # the pretraining workdir every trial starts from
    c.base = 'sentiment data.max_train_examples=1000 num_epochs=3'
    c.num_trials = 8  # finished (complete or pruned) trials; re-running continues up to it
    c.sampler = 'tpe'  # 'tpe' (Bayesian optimisation) or 'random'
    c.seed = 0  # of the sampler; each trial's fine-tuning seed is the base config's
    c.tpe_startup_trials = 3  # random trials before TPE models the results
    c.pruner = 'median'  # 'median' (stop below the median of earlier trials) or 'none'
    c.pruner_startup_trials = 3  # finished trials before the median pruner acts
    c.space = ml_collections.ConfigDict()
    for section in ('model', 'data'):  # so `--config.space.model.KEY=...` can add a key
        c.space[section] = ml_collections.ConfigDict()
    c.open_sections = ('space', 'space.model', 'space.data')
    c.space.learning_rate = 'loguniform(3e-5, 3e-3)'
    c.space.batch_size = 'choice(16, 32)'
    c.space.warmup_fraction = 'uniform(0, 0.2)'
    c.space.weight_decay = 'choice(0.0, 0.01, 0.1)'
    c.space.model.dropout_rate = 'uniform(0, 0.2)'
    c.space.freeze = "choice('none', 'layers:1', 'encoder')"
    apply_arg_overrides(c, extras)
    return c
