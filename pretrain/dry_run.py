"""`launch.py pretrain --dry-run`: what a run would be, without running it.

Everything is abstract: `jax.eval_shape` traces the model and optimizer init on a
`jax.sharding.AbstractMesh` of the configured shape, so a `large` model on a 256-chip mesh
is described on a laptop with nothing allocated. Printed: the resolved config and its diff
from the config file's defaults, the mesh, each parameter's sharding (logical axes -> mesh
axes, per-device shape), the parameter count (`params: 110.1M`), model FLOPs per step and
an estimate of memory per device.

Memory estimate per device (bytes), with local batch b = batch_size / (data-parallel size x
grad_accum_steps), sequence s, hidden h, intermediate i, heads a, tensor-parallel size t,
compute dtype bytes e, masked positions p, vocab v and L layers:
  - params, optimizer state: exact, from the abstract state and its shardings (float32);
  - gradients: the size of the params with the same sharding (float32);
  - activations kept for the backward pass of one micro-batch, counted per layer as
      matmul outputs    q, k, v 3sh/t, scores as^2/t, context sh/t, attention out sh,
                        FFN in->mid si/t, FFN mid->out sh
      other saved       softmax probs as^2/t, two LayerNorms' inputs and outputs 4sh,
                        GELU output si/t, the layer input sh
    remat 'none' keeps all of it, 'dots' keeps the matmul outputs and the layer input,
    'full' keeps the layer input of every layer plus one layer's full set (recomputed
    in the backward pass); plus the embeddings' output 2sh and the MLM head's 3ph (e
    bytes) and its logits and their gradient 2pv (float32). Attention scores are counted
    as materialized (explicit attention; a fused kernel saves the as^2 terms).
  Not counted: XLA temporaries and fusion buffers, the input batch, collectives' buffers.
  Treat the total as a guide to within tens of percent, not a guarantee.
"""

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from engine import mesh as mesh_lib
from engine.config_cli import config_to_json, flat_keys, load_config
from engine.errors import ConfigError
from models.bert import BertConfig
from models.flops import count_params
from pretrain import state as state_lib
from pretrain.sections import (
    bert_config,
    check_batch,
    final_config,
    masking_config,
    step_spec,
    validate_values,
)

GiB = 1024 ** 3


def abstract_mesh(cfg: ml_collections.ConfigDict, num_devices: int = 0) -> AbstractMesh:
    """The configured mesh without devices. A -1 takes `num_devices` (default: this
    machine's device count); an explicit shape may need more devices than exist here (the
    target cluster's)."""
    try:
        shape = mesh_lib.resolve_mesh_shape(cfg.mesh.shape, cfg.mesh.axes,
                                            num_devices or _target_devices(cfg))
    except ValueError as e:
        raise ConfigError(f'mesh.shape: {e}') from None
    return AbstractMesh(shape, tuple(cfg.mesh.axes), axis_types=(AxisType.Auto,) * len(shape))


def _target_devices(cfg) -> int:
    shape = [int(s) for s in cfg.mesh.shape]
    return jax.device_count() if -1 in shape else math.prod(shape)


def abstract_state(cfg: ml_collections.ConfigDict, mesh: AbstractMesh):
    """(abstract TrainState with boxes stripped, its shardings, its logical specs): the
    run's own state builder (pretrain/state.py) on the abstract mesh."""
    built = state_lib.build(step_spec(cfg), mesh)  # ELECTRA: both models
    return built.abstract, built.shardings, built.logical


def activation_bytes(model: BertConfig, cfg: ml_collections.ConfigDict, mesh_shape: dict,
                     max_predictions: int) -> int:
    """Estimated activation memory per device for one micro-batch (module docstring)."""
    data_parallel = math.prod(mesh_shape.get(a, 1) for a in mesh_lib.BATCH_AXES)
    b = max(cfg.batch_size // (data_parallel * cfg.grad_accum_steps), 1)
    s, h, i, a = cfg.seq_len, model.hidden_size, model.intermediate_size, model.num_heads
    t, e = mesh_shape.get('tensor', 1), np.dtype(model.dtype).itemsize
    p, v = max_predictions, model.vocab_size
    matmuls = 3 * s * h / t + a * s * s / t + s * h / t + s * h + s * i / t + s * h
    others = a * s * s / t + 4 * s * h + s * i / t
    layer_input = s * h
    per_layer = {'none': matmuls + others + layer_input, 'dots': matmuls + layer_input,
                 'full': layer_input}[model.remat]
    encoder = model.num_layers * per_layer
    if model.remat == 'full':
        encoder += matmuls + others
    elements = encoder + 2 * s * h + 3 * p * h
    return int(b * (elements * e + 2 * p * v * 4))


def config_diff(cfg: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> list[str]:
    """'key: default -> value' for every leaf that differs from the config file's defaults."""
    lines = []
    for key in flat_keys(cfg):
        value, default = _get(cfg, key), _get(defaults, key)
        if value != default:
            lines.append(f'  {key}: {default!r} -> {value!r}')
    return lines


def _get(config, dotted: str):
    node = config
    for part in dotted.split('.'):
        if part not in node:
            return '<absent>'
        node = node[part]
    return node


def describe(cfg: ml_collections.ConfigDict, spec: str, num_devices: int = 0) -> str:
    """The whole dry-run report as text; raises ConfigError for an inconsistent config.
    num_devices: what a -1 in mesh.shape takes (default: this machine's device count)."""
    cfg = final_config(cfg)  # seq_len_phases: sized at the last phase's length
    validate_values(cfg)
    mesh = abstract_mesh(cfg, num_devices)
    mesh_shape = dict(mesh.shape)
    check_batch(cfg, math.prod(mesh_shape.get(a, 1) for a in mesh_lib.BATCH_AXES))
    model = bert_config(cfg)
    step = step_spec(cfg, model)
    built = state_lib.build(step, mesh)  # the run's own state builder; ELECTRA: both models
    state, shardings, logical = built.abstract, built.shardings, built.logical
    masked = masking_config(cfg, model.vocab_size).max_predictions
    flops = state_lib.flops_per_step(step, built, masked)
    devices = math.prod(mesh_shape.values())
    lines = [f'config ({spec}):', config_to_json(cfg), f'changed from the defaults of {spec}:']
    lines += config_diff(cfg, load_config(spec)) or ['  (none)']
    lines.append(f'mesh: {mesh_shape} = {devices} devices '
                 f'(this machine has {jax.device_count()}; nothing is allocated)')
    lines.append(f'{"parameter":62s} {"shape":16s} {"logical axes":28s} '
                 f'{"mesh axes":26s} per device')
    lines += sharding_lines(state.params, shardings.params, logical.params, mesh_shape)
    lines.append(f'params: {count_params(state.params) / 1e6:.1f}M')
    lines.append(f'flops/step: {flops:.3e} (model FLOPs, all devices; '
                 f'{flops / devices:.3e} per device)')
    lines += _memory_lines(cfg, model, state, shardings, mesh_shape, masked)
    return '\n'.join(lines)


def sharding_lines(params, shardings, logical, mesh_shape: dict) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    rows = zip(flat, jax.tree.leaves(shardings), jax.tree.leaves(
        logical, is_leaf=lambda x: isinstance(x, PartitionSpec)), strict=True)
    lines = []
    for (path, leaf), sharding, names in rows:
        name = '/'.join(str(getattr(k, 'key', k)) for k in path)
        shape = tuple(leaf.shape)
        local = mesh_lib.per_device_shape(shape, sharding.spec, mesh_shape)
        lines.append(f'{name:62s} {str(shape):16s} {str(tuple(names)):28s} '
                     f'{str(tuple(sharding.spec)):26s} {local}')
    return lines


def _memory_lines(cfg, model, state, shardings, mesh_shape, masked) -> list[str]:
    params = mesh_lib.sharded_bytes(state.params, shardings.params, mesh_shape)
    optimizer = mesh_lib.sharded_bytes(state.opt_state, shardings.opt_state, mesh_shape)
    activations = activation_bytes(model, cfg, mesh_shape, masked)
    total = 2 * params + optimizer + activations  # gradients: params-sized
    return [f'memory/device: params {params / GiB:.2f} GiB, optimizer state '
            f'{optimizer / GiB:.2f} GiB, gradients {params / GiB:.2f} GiB, activations '
            f'~{activations / GiB:.2f} GiB (remat={model.remat}, {model.dtype}), '
            f'total ~{total / GiB:.2f} GiB']


def run(cfg: ml_collections.ConfigDict, spec: str, compile_for: str = '') -> None:
    """Prints the dry-run report; with `compile_for` (a TPU topology), the train step
    compiled for it too (ConfigError if it does not fit)."""
    from pretrain import continual
    cfg, _ = continual.resolve(cfg)  # a continual run's model is init_from's
    if not compile_for:
        print(describe(cfg, spec), flush=True)
        return
    from engine.compile_for import check_fits
    from pretrain.compile_target import compile_pretrain
    result = compile_pretrain(cfg, compile_for)  # starts JAX with the TPU compiler loaded
    print(describe(cfg, spec, len(result.target.devices)), flush=True)
    print('\n'.join(result.lines), flush=True)
    check_fits(result.target, result.compiled, result.advice)
