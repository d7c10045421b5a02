"""`launch.py finetune --dry-run [--compile-for=TOPOLOGY]`: what a fine-tuning run would be.

The config is validated and the task's data read as the run does; the classifier
(finetune/setup.py `build`), its trainable/frozen split and optimizer are built on abstract
parameters (`jax.eval_shape`: nothing allocated, no checkpoint read, nothing written).
Printed: the resolved config and its diff from the defaults, the mesh, each parameter's
sharding, trainable/frozen counts, model FLOPs per step and memory per device (params and
optimizer state exact, activations estimated as pretrain/dry_run.py does).

With `--compile-for`, the run's own train step (`setup.compile_steps`) is compiled for a
TPU slice's abstract devices (engine/compile_for.py) on the configured mesh; batches are
counted at the full `seq_len` (dynamic padding only ever cuts them shorter).
"""

import dataclasses
import functools
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from engine import compile_for
from engine import mesh as mesh_lib
from engine.config_cli import config_to_json, load_config
from engine.optim import learning_rate_at, make_optimizer
from engine.rundir import RunDir
from engine.step import TrainState
from finetune import distill, setup, span_tasks, unfreeze
from finetune.freeze import count_params_by_label
from finetune.train import validate
from models.bert import BertForSequenceClassification
from pretrain.dry_run import GiB, activation_bytes, config_diff, sharding_lines
from text.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class Abstract:
    built: setup.Built
    state: TrainState  # ShapeDtypeStructs carrying their shardings
    logical: object  # the parameters' logical axis names
    labels: object  # 'train'/'frozen' per parameter
    tx: object
    schedule: object
    num_steps: int


def _tokenizer(cfg: ml_collections.ConfigDict):
    """The tokenizer the run would use (init_from's or a given file), or a stand-in of the
    model's vocabulary size for a random-init run that would train its own."""
    source = setup.pretrained_dir(cfg)
    path = RunDir(source).tokenizer_file() if source is not None else cfg.tokenizer_model
    if path:
        return load_tokenizer(str(path))
    return types.SimpleNamespace(vocab_size=cfg.model.vocab_size)


def abstract_run(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 task: dict, for_tpu: bool) -> Abstract:
    """The run's classifier, first-phase labels, optimizer and abstract sharded state."""
    built = setup.build(cfg, task, _tokenizer(cfg))
    if for_tpu:  # the TPU's attention kernel, not this host's
        model_cfg = compile_for.for_tpu(built.model_cfg)
        built = dataclasses.replace(built, model=BertForSequenceClassification(model_cfg),
                                    model_cfg=model_cfg)
    ids = jnp.zeros((1, cfg.seq_len), jnp.int32)
    init = functools.partial(built.model.init, jax.random.key(cfg.seed), ids)
    with setup.sharding_context(mesh, cfg):  # as mesh_lib.abstract_and_shardings, keeping
        boxed = jax.eval_shape(lambda: init()['params'])  # the logical names to print
    logical = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, cfg.mesh.rules)
    params = mesh_lib.strip_boxes(boxed)
    rows = len(task['train'])
    num_steps = cfg.num_epochs * max(math.ceil(rows / cfg.batch_size), 1)
    phase = unfreeze.phase_of_state(0, cfg.gradual_unfreeze_steps, built.model_cfg.num_layers)
    labels = setup.phase_labels(cfg, params, built, phase)
    optimizer = setup.optimizer_config(cfg)
    tx = make_optimizer(optimizer, num_steps, params, labels, built.model_cfg.num_layers)
    sized = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         params, shardings)
    # Moments take their parameter's sharding (as jit(tx.init) gives the run); counters and
    # other leaves go replicated, as setup.fresh_optimizer puts them.
    opt_state = jax.jit(tx.init).lower(sized).compile().output_shardings
    opt_abstract = jax.eval_shape(tx.init, params)
    replicated = mesh_lib.replicated(mesh)
    opt_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if isinstance(
            s, jax.sharding.NamedSharding) else replicated), opt_abstract, opt_state)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = TrainState(step=step, params=sized, opt_state=opt_state)
    return Abstract(built, state, logical, labels, tx, learning_rate_at(optimizer, num_steps),
                    num_steps)


def abstract_batch(cfg: ml_collections.ConfigDict, built: setup.Built, mesh) -> dict:
    """One global training batch at the full seq_len, as ShapeDtypeStructs."""
    sharding = mesh_lib.batch_sharding(mesh)
    rows = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32, sharding=sharding)
    label = jnp.float32 if cfg.task == 'regression' else jnp.int32
    batch = {'input_ids': rows, 'token_type_ids': rows, 'attention_mask': rows,
             'labels': jax.ShapeDtypeStruct((cfg.batch_size,), label, sharding=sharding)}
    if span_tasks.handles(cfg.task):  # per-token labels, or answer positions
        batch = {k: v for k, v in batch.items() if k != 'labels'}
        batch.update(span_tasks.abstract_targets(cfg, sharding))
    if distill.enabled(cfg):
        batch['teacher_logits'] = jax.ShapeDtypeStruct(
            (cfg.batch_size, built.model_cfg.num_labels), jnp.float32, sharding=sharding)
    return batch


def state_sizes(run: Abstract, mesh) -> dict:
    """Per-device bytes: parameters, optimizer state, gradients (the trainable ones)."""
    shape = dict(mesh.shape)
    shardings = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
    trainable = jax.tree.map(lambda x, label: x if label == 'train' else None,
                             run.state.params, run.labels)
    return {'params': mesh_lib.sharded_bytes(run.state.params, shardings(run.state.params), shape),
            'optimizer state': mesh_lib.sharded_bytes(run.state.opt_state,
                                             shardings(run.state.opt_state), shape),
            'gradients': mesh_lib.sharded_bytes(trainable, shardings(trainable), shape)}


def describe(cfg: ml_collections.ConfigDict, spec: str, mesh, run: Abstract) -> str:
    """The analytic report (the pretraining dry run's, for the classifier)."""
    shape = dict(mesh.shape)
    lines = [f'config ({spec}):', config_to_json(cfg), f'changed from the defaults of {spec}:']
    lines += config_diff(cfg, load_config(spec)) or ['  (none)']
    lines.append(f'mesh: {shape} = {mesh.size} devices (nothing is allocated)')
    lines.append(f'{"parameter":62s} {"shape":16s} {"logical axes":28s} '
                 f'{"mesh axes":26s} per device')
    shardings = jax.tree.map(lambda x: x.sharding, run.state.params)
    lines += sharding_lines(run.state.params, shardings, run.logical, shape)
    counts = count_params_by_label(run.state.params, run.labels)
    lines.append(f'params: {counts["train"] / 1e6:.1f}M trainable, '
                 f'{counts["frozen"] / 1e6:.1f}M frozen (init: {run.built.source})')
    flops = run.built.flops(cfg)
    lines.append(f'flops/step: {flops:.3e} (model FLOPs, all devices; '
                 f'{flops / mesh.size:.3e} per device); {run.num_steps} steps')
    sizes = state_sizes(run, mesh)
    activations = activation_bytes(run.built.model_cfg, cfg, shape, 0)
    total = sum(sizes.values()) + activations
    lines.append('memory/device: ' + ', '.join(f'{k} {v / GiB:.2f} GiB' for k, v in
                                               sizes.items())
                 + f', activations ~{activations / GiB:.2f} GiB (remat='
                 f'{run.built.model_cfg.remat}), total ~{total / GiB:.2f} GiB')
    return '\n'.join(lines)


def run(cfg: ml_collections.ConfigDict, spec: str, topology: str = '') -> None:
    """Prints the dry-run report; with `topology`, the train step compiled for that TPU
    slice too (ConfigError, one line, if it does not fit)."""
    target = compile_for.target(topology) if topology else None  # before JAX starts
    cfg, mesh, task = validate(cfg, target.devices if target else None)
    abstract = abstract_run(cfg, mesh, task, for_tpu=target is not None)
    print(describe(cfg, spec, mesh, abstract), flush=True)
    if target is None:
        return
    built, state = abstract.built, abstract.state
    advice = compile_advice(cfg, dict(mesh.shape))
    with setup.sharding_context(mesh, cfg):
        train, _ = setup.compile_steps(cfg, mesh, built, abstract.tx, abstract.labels,
                                       abstract.schedule, state)
        compiled = compile_for.compile_step(train, (state, abstract_batch(cfg, built, mesh)),
                                            target, advice)
    sizes = state_sizes(abstract, mesh)
    print('\n'.join(compile_for.report(target, compiled, sizes, built.flops(cfg))), flush=True)
    compile_for.check_fits(target, compiled, advice)


def compile_advice(cfg: ml_collections.ConfigDict, mesh_shape: dict) -> str:
    """What to change when the step does not fit, in fine-tuning's keys."""
    steps = []
    if mesh_shape.get('fsdp', 1) == 1:
        steps.append('shard the state with mesh.shape=(1,-1) (fsdp)')
    steps.append(f'a smaller batch_size or grad_accum_steps > {cfg.grad_accum_steps}, '
                 'a shorter seq_len, or freeze/peft')
    return 'try ' + ', '.join(steps)
