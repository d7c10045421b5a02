"""`launch.py pretrain --dry-run --compile-for=TOPOLOGY`: the run's own train step
(pretrain/state.py, as the run builds it) compiled for a TPU slice on this machine.

Nothing is allocated: the state is abstract (`jax.eval_shape`), the step is lowered with
ShapeDtypeStructs on a mesh of the topology's abstract devices. See engine/compile_for.py.
"""

import dataclasses

import jax.numpy as jnp
import ml_collections

from engine import compile_for
from engine import mesh as mesh_lib
from engine.errors import ConfigError
from pretrain import state as state_lib
from pretrain.sections import (
    bert_config,
    check_batch,
    final_config,
    masking_config,
    step_spec,
    validate_values,
)


@dataclasses.dataclass(frozen=True)
class Result:
    target: compile_for.Target
    compiled: compile_for.Compiled
    sizes: dict  # per-device bytes of params, optimizer state, gradients, batch
    counted_flops: float  # models/flops.py, all devices
    lines: list
    advice: str  # what to change if it does not fit


def compile_pretrain(cfg: ml_collections.ConfigDict, topology: str) -> Result:
    """Compiles the configured train step for `topology`; raises ConfigError for a bad
    config and for a step the compiler refuses for want of HBM (one that compiles but does
    not fit is for compile_for.check_fits)."""
    target = compile_for.target(topology)  # before anything starts a JAX backend
    cfg = final_config(cfg)
    validate_values(cfg)
    try:
        mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes, devices=target.devices)
    except ValueError as e:
        raise ConfigError(f'mesh.shape: {e} (on {topology})') from None
    check_batch(cfg, mesh_lib.data_parallel_size(mesh))
    model_cfg = compile_for.for_tpu(bert_config(cfg))  # the TPU's kernel, not this CPU's
    spec = step_spec(cfg, model_cfg)
    built = state_lib.build(spec, mesh)
    shape = dict(mesh.shape)
    masking = masking_config(cfg, model_cfg.vocab_size)
    # Whole-word masking's table is a constant of the step; its values do not change the
    # compiled program's size.
    word_starts = jnp.zeros((model_cfg.vocab_size,), bool) if masking.whole_word else None
    with mesh_lib.sharding_context(mesh, cfg.mesh.rules):
        train, _ = state_lib.compile_steps(spec, mesh, built, masking, word_starts)
        compiled = compile_for.compile_step(train, state_lib.abstract_step_args(spec, built),
                                            target, advice(cfg, shape))
    params = mesh_lib.sharded_bytes(built.abstract.params, built.shardings.params, shape)
    batch = state_lib.abstract_batch(spec)
    sizes = {'params': params,
             'optimizer state': mesh_lib.sharded_bytes(built.abstract.opt_state,
                                              built.shardings.opt_state, shape),
             'gradients': params,
             'batch': sum(b.size * 4 for b in batch.values()) // mesh_lib.data_parallel_size(mesh)}
    flops = state_lib.flops_per_step(spec, built, masking.max_predictions)
    lines = compile_for.report(target, compiled, sizes, flops)
    return Result(target, compiled, sizes, flops, lines, advice(cfg, shape))


def advice(cfg: ml_collections.ConfigDict, mesh_shape: dict) -> str:
    """What to change when the step does not fit, in this config's own keys."""
    steps = []
    if mesh_shape.get('fsdp', 1) == 1:
        steps.append("shard the state with mesh.shape=(1,-1) (fsdp)")
    remat = cfg.model.remat
    if remat != 'full':
        steps.append(f"model.remat={'dots' if remat == 'none' else 'full'}")
    steps.append(f'a smaller batch_size or grad_accum_steps > {cfg.grad_accum_steps}')
    return 'try ' + ', '.join(steps)
