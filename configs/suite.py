"""Multi-seed evaluation suites: `get_config(arg)` with arg = SUITE[,key=value,...].

    python launch.py evaluate --config configs/suite.py:demo --workdir runs/eval \
        --config.init_from=runs/tiny

fine-tunes every task in `tasks` under every variant in `variants` with every seed in
`seeds` (each run a normal fine-tuning workdir, `WORKDIR/TASK/VARIANT/seed_N/`), then writes
`WORKDIR/results.md` and `results.csv`: mean ± sample standard deviation over seeds of
each metric, per task and variant. Re-running the command skips finished runs and resumes
an interrupted one, so a suite survives preemption task by task.

Suites:
  demo     the shipped sentiment tweets with 2,000 of the training labels (5 epochs) and with
           all 29.8k (1 epoch), pretrained vs from scratch, 3 seeds: about 25 minutes
           on 2 CPU cores (see README for the measured table).
  quick    the 2,000-label sentiment task only, pretrained vs from scratch, 3 seeds (the
           README demo's table; about 8 minutes on 2 CPU cores).

A task is `name: 'FINETUNE_CONFIG_ARG key=value ...'` (the arg of configs/finetune.py, then
overrides of its keys; '' drops the task). A variant is `name: 'key=value ...'` applied on top; the
`scratch` variant's `init_from=none` reuses the pretrained run's tokenizer so that only the
weights differ. Add either from the command line, e.g.
`--config.variants.probe='freeze=encoder'` or
`--config.tasks.mine='custom data.train_file=my.csv num_epochs=3'`.
"""

import ml_collections

from configs.pretrain import apply_arg_overrides

SUITES = ('demo', 'quick')
SENTIMENT_LOW_LABEL = 'sentiment data.max_train_examples=2000 num_epochs=5'


def get_config(arg: str = 'demo') -> ml_collections.ConfigDict:
    """Returns the suite config for `arg` = 'SUITE[,key=value,...]'."""
    suite, *extras = arg.split(',')
    if suite not in SUITES:
        raise ValueError(f'config arg: unknown suite {suite!r}; choose from {list(SUITES)}')
    c = ml_collections.ConfigDict()
    c.init_from = ''  # the pretraining workdir every 'pretrained' run starts from
    c.seeds = (0, 1, 2)  # each run's `seed`: head init, data order, dropout
    c.metrics = ('accuracy', 'f1')  # columns of the tables (test split, else validation)
    c.tasks = ml_collections.ConfigDict()
    c.variants = ml_collections.ConfigDict({'pretrained': '', 'scratch': 'init_from=none'})
    c.open_sections = ('tasks', 'variants')  # `--config.tasks.NEW=...` adds an entry
    if suite == 'demo':
        c.tasks.sentiment_2k = SENTIMENT_LOW_LABEL
        c.tasks.sentiment = 'sentiment'
    else:
        c.tasks.sentiment_2k = SENTIMENT_LOW_LABEL
    apply_arg_overrides(c, extras)
    return c
