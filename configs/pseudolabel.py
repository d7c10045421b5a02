"""Semi-supervised pseudo-labelling: `get_config(arg)` with arg = SETUP[,key=value,...].

    python launch.py pseudolabel --config configs/pseudolabel.py:demo --workdir runs/pl \
        --config.init_from=runs/tiny

Round 0 fine-tunes on the labelled task (`WORKDIR/round_0/`, an ordinary fine-tuning
workdir). Its best checkpoint then labels the unlabelled pool; the predictions whose top
class probability is >= `threshold` (at most `max_pseudo_per_class` per predicted class,
the most confident first) join the labelled examples as round 1's training set, and round
1 fine-tunes again from `init_from` (not from round 0's weights: classic self-training, so
the student does not inherit the teacher's fitted head) with the same validation and test
split. With `rounds` > 1 each round's model relabels the whole pool for the next. Writes
`WORKDIR/results.md` / `results.json`: per round the validation and test metrics, the
pseudo-labels accepted and - when the pool carries true labels (`gold_column`) - their
precision. Re-running the command reads finished rounds back and resumes an interrupted one.

Setups:
  demo    the shipped sentiment tweets with 2,000 training labels (5 epochs); the pool is
          the other 27.8k training tweets, their labels hidden from training and used
          only to score the pseudo-labels. Class-balanced selection: the 1,000 most
          confident predictions of each class (`threshold=0 max_pseudo_per_class=1000`);
          a plain `threshold=0.9` accepted almost only the majority class (see README).
          Measured: 34 minutes on 2 heavily shared CPU cores.
  custom  your own task and pool: set `task` (e.g. "custom data.train_file=train.csv") and
          `unlabeled_file`.
"""

import ml_collections

from configs.pretrain import apply_arg_overrides

SETUPS = ('demo', 'custom')
REST = 'rest'  # unlabeled_file: the task's training examples left out of its labelled subset


def get_config(arg: str = 'demo') -> ml_collections.ConfigDict:
    """Returns the pseudo-labelling config for `arg` = 'SETUP[,key=value,...]'."""
    setup, *extras = arg.split(',')
    if setup not in SETUPS:
        raise ValueError(f'config arg: unknown setup {setup!r}; choose from {list(SETUPS)}')
    c = ml_collections.ConfigDict()
    c.init_from = ''  # the pretraining workdir every round starts from ('none' = random init)
    # The labelled task: 'FINETUNE_CONFIG_ARG key=value ...' (the arg of configs/finetune.py,
    # then overrides of its keys), as a suite's task. Classification only.
    c.task = ''
    # Unlabelled text: a CSV/TSV/JSONL file with the task's text column(s) (extra columns
    # are ignored), or 'rest': the task's training examples outside its labelled subset
    # (needs data.max_train_examples or data.few_shot_k), written to WORKDIR/pool.jsonl;
    # their true labels (column 'gold_label' there) only score the pseudo-labels.
    c.unlabeled_file = ''
    # A column of true labels in an unlabeled_file, read only to score the pseudo-labels
    # (precision); never trained on. '' = the file has none.
    c.gold_column = ''
    c.threshold = 0.9  # accept a prediction whose top class probability is >= this
    c.max_pseudo_per_class = 0  # most confident N per predicted class; 0 = no cap
    c.rounds = 1  # retraining rounds after round 0 (1 = teacher, then one student)
    c.retrain = ''  # 'key=value ...' fine-tuning overrides for rounds >= 1 only
    if setup == 'demo':
        c.task = 'sentiment data.max_train_examples=2000 num_epochs=5'
        c.unlabeled_file = REST
        c.threshold, c.max_pseudo_per_class = 0.0, 1000
    apply_arg_overrides(c, extras)
    return c
