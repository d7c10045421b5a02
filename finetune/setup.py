"""Fine-tuning set-up: the pretrained run, tokenizer, model, sharded state, jitted steps."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from engine import mesh as mesh_lib
from engine.checkpoint import Checkpoints, saved_steps, subtree_reader
from engine.errors import ConfigError
from engine.optim import OptimizerConfig, learning_rate_at, make_optimizer
from engine.paths import absolute_path, write_bytes_atomic
from engine.rundir import SPM_FILENAME, RunDir
from engine.step import TrainState
from finetune import contrastive, distill, peft, span_tasks, steps, unfreeze
from models.bert import BertConfig, BertForSequenceClassification
from models.config import RUNTIME_FIELDS, model_config
from models.embedding import BertForSentenceEmbedding
from models.flops import forward_flops, train_flops_per_step
from models.load import ENCODER_PARTS, load
from models.peft import is_peft_path
from pretrain.continual import same_vocabulary
from text.tokenizer import Tokenizer, load_or_train_tokenizer, load_tokenizer


def pretrained_dir(cfg: ml_collections.ConfigDict) -> epath.Path | None:
    return None if cfg.init_from.lower() == 'none' else absolute_path(cfg.init_from)


# learning_rate=0 ('auto'): the peak by model width. 3e-4 for tiny (H128) was the best of
# 3e-5/1e-4/3e-4 on the demo task (docs/finetuning.md); wider models step down towards
# BERT's 2e-5..5e-5 (Devlin et al. 2018), which were not measured here.
AUTO_LEARNING_RATES = ((128, 3e-4), (256, 1e-4), (512, 5e-5))
LARGE_MODEL_LEARNING_RATE = 2e-5


def learning_rate_for_width(hidden_size: int) -> float:
    """The 'auto' peak fine-tuning learning rate of a model `hidden_size` wide."""
    for width, rate in AUTO_LEARNING_RATES:
        if hidden_size <= width:
            return rate
    return LARGE_MODEL_LEARNING_RATE


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    """The optimizer settings, typed: the `optimizer` section, whose entries are the
    top-level keys of the same names (a config written before the section has only those).
    Errors name the top-level keys, the ones fine-tuning commands set."""
    section = cfg.optimizer if 'optimizer' in cfg else cfg
    for key, value in (section.items() if section is not cfg else ()):
        if key in cfg and cfg[key] != value:
            raise ConfigError(f'optimizer.{key}: {value!r}, but {key} says {cfg[key]!r}; '
                              'they are one setting (set one of them)')
    return OptimizerConfig.from_config(section, '')


def model_width(cfg: ml_collections.ConfigDict) -> int:
    """The hidden size of the model the run trains: init_from's, or `model` for random init."""
    root = pretrained_dir(cfg)
    model = RunDir(root).read_config()['model'] if root is not None else cfg.model
    return int(model['hidden_size'])


def resolved_learning_rate(cfg: ml_collections.ConfigDict) -> float:
    """cfg.learning_rate, or when it is 0 ('auto') the rate for the width of the model it
    will train (init_from's, or `model` for random init)."""
    return cfg.learning_rate or learning_rate_for_width(model_width(cfg))


# num_epochs=0 ('auto', the `custom` default): the fewest whole epochs, at least 3 (BERT's),
# that make a minimum number of steps, by model width. A few thousand rows are ~60-150 steps
# an epoch: 3 epochs left the tiny encoder (H128) still improving on TREC, so narrow encoders
# get at least 1,500 steps. A real pretrained encoder (MiniLM, H384) on 2,000 TREC rows had
# its best validation F1 at 378 steps (3 epochs, 189 steps, were 0.13 F1 short of it) and
# 1,500 steps took 2 h on 2 cores (docs/finetuning.md), so wider ones get at least 400.
# The best checkpoint on validation is what is kept, so extra epochs mostly cost time.
AUTO_MIN_EPOCHS = 3
AUTO_MIN_STEPS = 1500  # up to AUTO_NARROW_WIDTH
AUTO_NARROW_WIDTH = 256
AUTO_MIN_STEPS_WIDE = 400


def min_steps_for_width(hidden_size: int) -> int:
    """The 'auto' minimum number of fine-tuning steps of a model `hidden_size` wide."""
    return AUTO_MIN_STEPS if hidden_size <= AUTO_NARROW_WIDTH else AUTO_MIN_STEPS_WIDE


def epochs_for_size(num_examples: int, batch_size: int, min_steps: int = AUTO_MIN_STEPS) -> int:
    """The 'auto' number of epochs over `num_examples` training examples."""
    steps_per_epoch = math.ceil(num_examples / batch_size)
    return max(AUTO_MIN_EPOCHS, math.ceil(min_steps / max(steps_per_epoch, 1)))


def resolved_num_epochs(cfg: ml_collections.ConfigDict, num_examples: int) -> int:
    """cfg.num_epochs, or when it is 0 ('auto') the number for the training set's size and
    the model's width."""
    if cfg.num_epochs:
        return cfg.num_epochs
    min_steps = min_steps_for_width(model_width(cfg))
    return epochs_for_size(num_examples, cfg.batch_size, min_steps)


def check_init_from(cfg: ml_collections.ConfigDict) -> None:
    """A pretraining workdir must hold its config, tokenizer and a checkpoint."""
    if not cfg.init_from:
        raise ConfigError("init_from: set a pretraining workdir, or 'none' for random init")
    root = pretrained_dir(cfg)
    if root is None:
        if cfg.tokenizer_model and not epath.Path(cfg.tokenizer_model).is_file():
            raise ConfigError(f'tokenizer_model: no such file {cfg.tokenizer_model!r}')
        return
    run = RunDir(root)
    if run.tokenizer_file() is None:  # spm.model, or an imported wordpiece.json
        raise ConfigError(f'init_from: {str(root)!r} has no {SPM_FILENAME}; is it a '
                          'pretraining workdir?')
    for path in (run.config_file, run.checkpoints):
        if not path.exists():
            raise ConfigError(f'init_from: {str(root)!r} has no {path.name}; is it a '
                              'pretraining workdir?')
    saved_steps(run.checkpoints, cfg.init_step)
    check_tokenizer(cfg, run)


def check_tokenizer(cfg: ml_collections.ConfigDict, run: RunDir) -> None:
    """A tokenizer_model given with init_from must have its vocabulary (the same pieces at
    the same ids): its ids index the pretrained embedding rows. Fine-tuning does not resize
    them; continual pretraining does (pretrain/continual.py)."""
    if not cfg.tokenizer_model:
        return
    path = cfg.tokenizer_model
    if not epath.Path(path).is_file():
        raise ConfigError(f'tokenizer_model: no such file {path!r}')
    try:
        given, own = load_tokenizer(path), load_tokenizer(run.tokenizer_file())
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f'tokenizer_model: cannot load {path!r} ({e})') from None
    if same_vocabulary(own, given):
        return
    sizes = (f'{given.vocab_size} pieces against {own.vocab_size}' if
             given.vocab_size != own.vocab_size else 'other pieces at the same ids')
    raise ConfigError(
        f'tokenizer_model: {path} has another vocabulary than init_from {run} ({sizes}); its '
        'ids would index the wrong embedding rows. Resize the vocabulary by continual '
        f'pretraining first (launch.py pretrain --config.init_from={run} '
        f'--config.data.tokenizer_model={path} --workdir NEW; docs/continual.md), then '
        'fine-tune with --config.init_from=NEW')


def tokenizer_for(cfg, workdir: epath.Path, task: dict) -> Tokenizer:
    """The pretrained run's tokenizer (copied into this workdir), a given one, or - for a
    from-scratch run without one - a tokenizer trained on the task's training text."""
    source = pretrained_dir(cfg)
    if source is not None and RunDir(workdir).tokenizer_file() is None:
        given = epath.Path(RunDir(source).tokenizer_file())
        write_bytes_atomic(workdir / given.name, given.read_bytes())
    texts = lambda: iter(task['train'].text_a + (task['train'].text_b or []))  # noqa: E731
    return load_or_train_tokenizer(str(workdir), texts, cfg.model.vocab_size, 'unigram',
                                   cfg.tokenizer_model)


@dataclasses.dataclass(frozen=True)
class Built:
    model: nn.Module  # BertForSequenceClassification, or a models/heads.py head
    model_cfg: BertConfig
    source: str  # where the encoder weights come from, for the log
    saved_layers: int = 0  # > 0: the pretrained run's encoder is scanned, of this depth

    def flops(self, cfg) -> float:
        """Model FLOPs per step; a linear probe runs the encoder forward only; an embedding
        run encodes anchors and positives (twice the rows)."""
        rows = cfg.batch_size * (2 if cfg.task == 'embedding' else 1)
        if cfg.freeze == 'encoder':
            return forward_flops(self.model_cfg, rows, cfg.seq_len, 0)
        if peft.method(cfg) != 'none':  # backward through activations, no frozen weight grads
            return 2 * forward_flops(self.model_cfg, rows, cfg.seq_len, 0)
        return train_flops_per_step(self.model_cfg, rows, cfg.seq_len, 0)


def build(cfg, task: dict, tokenizer: Tokenizer) -> Built:
    """The classifier: the pretrained run's architecture (or `model` for random init), this
    config's dropout, dtype and remat, and one output per label (one for regression)."""
    source = pretrained_dir(cfg)
    if source is not None:
        model_section = RunDir(source).read_config()['model']
    else:
        model_section = cfg.model.to_dict()
    own = {key: cfg.model[key] for key in RUNTIME_FIELDS if key in cfg.model}
    fields = {**model_section, **own,  # this run's dropout, dtype and remat
              'pooling': cfg.model.get('pooling', 'cls'),
              'classifier_head': (cfg.model.get('classifier_head') or
                                  model_section.get('classifier_head') or 'bert'),
              'attention_impl': cfg.model.get('attention_impl', 'auto'),  # a runtime choice
              'scan_layers': False,  # per-layer names: freezing, layer-wise rates, PEFT
              'num_labels': _num_labels(cfg.task, task['label_names']),
              **peft.model_fields(cfg), **distill.model_fields(cfg, model_section['num_layers'])}
    try:
        model_cfg = model_config(fields)
    except ValueError as e:
        raise ConfigError(f'model: {e}') from None
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f'model.vocab_size: {model_cfg.vocab_size} is smaller than the '
                          f'tokenizer vocabulary ({tokenizer.vocab_size})')
    if span_tasks.handles(cfg.task):  # per-token heads have no pooler: none is loaded
        model_cfg = dataclasses.replace(model_cfg, mlm_pooler=False, pooling='cls')
    model_class = (BertForSentenceEmbedding if cfg.task == 'embedding'  # pooled, no head
                   else span_tasks.model_class(cfg.task) if span_tasks.handles(cfg.task)
                   else BertForSequenceClassification)
    return Built(model_class(model_cfg), model_cfg,
                 f'{source} (encoder)' if source else 'random',
                 model_section['num_layers'] if model_section.get('scan_layers') else 0)


def _num_labels(task: str, label_names) -> int:
    if span_tasks.handles(task):
        return span_tasks.num_outputs(task, label_names)
    return len(label_names or ()) or 1  # regression, embedding: one output


def _fresh_params(cfg, mesh, built: Built):
    ids = jnp.zeros((1, cfg.seq_len), jnp.int32)
    init = functools.partial(built.model.init, jax.random.key(cfg.seed), ids)
    with sharding_context(mesh, cfg):
        _, shardings = mesh_lib.abstract_and_shardings(lambda: init()['params'], mesh,
                                                       cfg.mesh.rules)
        params = jax.jit(lambda: nn.unbox(init()['params']), out_shardings=shardings)()
    return params


def _load_encoder(cfg, params: dict, built: Built) -> dict:
    """Replaces embeddings and encoder with the pretrained ones, on this run's shardings.
    LoRA / adapter / prefix parameters are not in a pretraining checkpoint: they stay fresh;
    a distillation student with fewer layers reads each from its pretrained source layer.
    An imported checkpoint's pretrained pooler (model.mlm_pooler) is read too for [CLS]
    pooling, as transformers' BertForSequenceClassification starts from it."""
    m = built.model_cfg
    parts = (*ENCODER_PARTS, 'pooler') if m.mlm_pooler and m.pooling == 'cls' else ENCODER_PARTS
    try:
        read = subtree_reader(str(RunDir(pretrained_dir(cfg)).checkpoints), cfg.init_step or None)
        return load(params, read, parts=parts, layer_map=distill.source_names(cfg),
                    dont_load=is_peft_path, saved_layers=built.saved_layers)
    except ValueError as e:  # shapes differ: another architecture
        raise ConfigError(f'init_from: cannot load its encoder: {e}') from None


def phase_labels(cfg, params, built: Built, phase: int):
    """'train'/'frozen' labels of `freeze` in gradual-unfreezing phase `phase`."""
    try:
        labels = unfreeze.phase_labels(params, cfg.freeze, built.model_cfg.num_layers, phase)
    except ValueError as e:
        raise ConfigError(f'freeze: {e}') from None
    if built.model_cfg.lora_rank:
        peft.check_targets(params, built.model_cfg.lora_targets)
    return peft.labels(params, cfg, labels)  # with peft.method: only its params + the head


def fresh_optimizer(cfg, mesh, built: Built, params, labels, num_steps: int, step: int = 0):
    """(tx, opt_state) for `labels`, its learning-rate schedule at `step`."""
    tx = make_optimizer(optimizer_config(cfg), num_steps, params, labels,
                        built.model_cfg.num_layers)
    # Moments inherit the parameters' shardings; step counters go replicated on the mesh.
    opt_state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
        else jax.device_put(x, mesh_lib.replicated(mesh)), jax.jit(tx.init)(params))
    return tx, unfreeze.continue_schedule(opt_state, step) if step else opt_state


def initial_state(cfg, mesh, built: Built, num_steps: int, phase: int):
    """(state, labels, tx, schedule): fresh head, pretrained encoder, the trainable/frozen
    split of gradual-unfreezing phase `phase` (the last phase when it is off)."""
    params = _fresh_params(cfg, mesh, built)
    if pretrained_dir(cfg) is not None:
        params = _load_encoder(cfg, params, built)
    labels = phase_labels(cfg, params, built, phase)
    tx, opt_state = fresh_optimizer(cfg, mesh, built, params, labels, num_steps)
    step = jax.device_put(jnp.zeros((), jnp.int32), mesh_lib.replicated(mesh))
    state = TrainState(step=step, params=params, opt_state=opt_state)
    return state, labels, tx, learning_rate_at(optimizer_config(cfg), num_steps)


def enter_phase(cfg, mesh, built: Built, state, num_steps: int, phase: int):
    """(state, labels, tx) of the next gradual-unfreezing phase; Adam restarts."""
    labels = phase_labels(cfg, state.params, built, phase)
    tx, opt_state = fresh_optimizer(cfg, mesh, built, state.params, labels, num_steps,
                                    int(state.step))
    return state.replace(opt_state=opt_state), labels, tx


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def resume(cfg, mesh, built: Built, ckpts: Checkpoints, state, num_steps: int, phase: int):
    """(state, start step, its JSON meta) from the newest checkpoint that restores (a
    damaged newer one is set aside with one line); `state` itself when there is none.
    `state` is the fresh state of gradual-unfreezing phase `phase`; a checkpoint of another
    phase restores onto that phase's optimizer state."""
    every, num_layers = cfg.gradual_unfreeze_steps, built.model_cfg.num_layers

    def template(step: int):
        at = unfreeze.phase_of_state(step, every, num_layers)
        like = state if at == phase else enter_phase(cfg, mesh, built, state, num_steps, at)[0]
        return _abstract(like), _shardings(like)

    found = ckpts.restore_latest(None, None, template_for=template)
    if found is None:
        return state, 0, None
    step, restored, meta = found
    return restored, step, meta


def phase_optimizer(cfg, mesh, built: Built, params, num_steps: int, phase: int):
    """(labels, tx) of gradual-unfreezing phase `phase`."""
    labels = phase_labels(cfg, params, built, phase)
    tx, _ = fresh_optimizer(cfg, mesh, built, params, labels, num_steps)
    return labels, tx


def restore_best(best_ckpts: Checkpoints, state, step: int):
    """The parameters of best checkpoint `step`, on the state's shardings."""
    target = {'params': state.params}
    restored, _ = best_ckpts.restore(step, _abstract(target), _shardings(target))
    return restored['params']


def compile_steps(cfg, mesh, built: Built, tx, labels, schedule, state):
    """The jitted train step (state donated) and prediction step."""
    shardings = _shardings(state)
    batch = mesh_lib.batch_sharding(mesh)
    if cfg.task == 'embedding':  # InfoNCE over the global batch (finetune/contrastive.py)
        return contrastive.compile_steps(cfg, mesh, built.model, tx, labels, schedule,
                                         shardings)
    if span_tasks.handles(cfg.task):
        return _span_steps(cfg, built, tx, labels, schedule, shardings, batch)
    train = jax.jit(steps.classifier_train_step(model=built.model, tx=tx, labels=labels,
                                                schedule=schedule, task=cfg.task,
                                                seed=cfg.seed, distill=distill.loss_settings(cfg),
                                                grad_accum_steps=cfg.get('grad_accum_steps', 1)),
                    in_shardings=(shardings, batch), out_shardings=(shardings, None),
                    donate_argnums=0)
    predict = jax.jit(functools.partial(steps.predict_step, model=built.model, task=cfg.task),
                      in_shardings=(shardings.params, batch))
    return train, predict


def _span_steps(cfg, built: Built, tx, labels, schedule, shardings, batch):
    train = jax.jit(span_tasks.train_step(model=built.model, tx=tx, labels=labels,
                                          schedule=schedule, task=cfg.task, seed=cfg.seed,
                                          grad_accum_steps=cfg.get('grad_accum_steps', 1)),
                    in_shardings=(shardings, batch), out_shardings=(shardings, None),
                    donate_argnums=0)
    predict = jax.jit(functools.partial(span_tasks.predict_step, model=built.model),
                      in_shardings=(shardings.params, batch))
    return train, predict


def sharding_context(mesh, cfg):
    return mesh_lib.sharding_context(mesh, cfg.mesh.rules)
