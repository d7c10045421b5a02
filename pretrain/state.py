"""The pretraining state and train step, built in one place.

The run (pretrain/train.py), `--dry-run` (on an abstract mesh), `--dry-run --compile-for`,
the throughput benchmark and `launch.py import` all call `build` (and `compile_steps`), so
the step compiled for a TPU slice on a CPU, or timed by the benchmark, is the step the run
executes, and an imported checkpoint has the state a run restores.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh

from engine import mesh as mesh_lib
from engine.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from engine.step import TrainState
from models.config import BertConfig
from pretrain import objective, steps
from pretrain.masking import MaskingConfig
from pretrain.objective import ObjectiveConfig


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the state and the step are built from, read once from the config at the entry
    (pretrain/sections.step_spec): the model, optimizer and objective, the batch's shape,
    the seed and the logical-axis rules."""
    model: BertConfig
    optimizer: OptimizerConfig
    objective: ObjectiveConfig
    seed: int
    batch_size: int
    seq_len: int
    grad_accum_steps: int
    num_train_steps: int
    rules: tuple  # mesh.rules: (logical axis, mesh axes) pairs


@dataclasses.dataclass(frozen=True)
class PretrainState:
    """The model, optimizer, fresh-state init and the state's abstract shapes and shardings
    on the run's mesh (nothing allocated)."""
    model: nn.Module
    tx: optax.GradientTransformation
    init: Callable[[], Any]  # the fresh state, boxed (logical axis names)
    abstract: TrainState
    shardings: TrainState
    logical: TrainState  # each leaf's logical axis names (PartitionSpecs), for dry runs


def build(spec: StepSpec, mesh: jax.sharding.Mesh | AbstractMesh) -> PretrainState:
    """The run's model (`objective`'s), optimizer and abstract sharded state on `mesh` (a
    device mesh, or an AbstractMesh: a dry run of a cluster's shape; nothing allocated)."""
    model = objective.build_model(spec.objective, spec.model)
    tx = make_optimizer(spec.optimizer, spec.num_train_steps)
    init = functools.partial(steps.init_state, jax.random.key(spec.seed), model, tx,
                             spec.seq_len)
    with _tracing_context(mesh, spec.rules):
        boxed = jax.eval_shape(init)
    logical = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, spec.rules)
    return PretrainState(model, tx, init, mesh_lib.strip_boxes(boxed), shardings, logical)


def _tracing_context(mesh, rules):
    if isinstance(mesh, AbstractMesh):
        return _abstract_context(mesh, rules)
    return mesh_lib.sharding_context(mesh, rules)


@contextlib.contextmanager
def _abstract_context(mesh: AbstractMesh, rules):
    with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def imported_state(built: PretrainState, params: dict) -> TrainState:
    """Step 0 with `params` (an imported checkpoint's, host arrays) and the optimizer's
    fresh state: what `pretrain` restores from a workdir `launch.py import` wrote."""
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=built.tx.init(params))


def checkpoint_meta(spec: StepSpec, config: dict, position: int, **extra: Any) -> dict:
    """A pretraining checkpoint's JSON side item: where its data stands (`position`: batches
    consumed, NaN-skipped ones included), the config it was made with (`config`, as a dict)
    and `extra` (budget, imported_from). Resume checks read it back (pretrain/train.py)."""
    return {'data': {'seed': spec.seed, 'batch_size': spec.batch_size, 'position': position},
            'config': config, **extra}


def fresh_state(built: PretrainState) -> TrainState:
    """A sharded fresh init (call inside the run's sharding context)."""
    return jax.jit(lambda: nn.unbox(built.init()), out_shardings=built.shardings)()


def feeds_rate(spec: StepSpec) -> bool:
    """schedule='budget': the host passes the learning rate as a third step argument."""
    return spec.optimizer.schedule == 'budget'


def compile_steps(spec: StepSpec, mesh: jax.sharding.Mesh, built: PretrainState,
                  masking: MaskingConfig, word_starts: jax.Array | None
                  ) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step."""
    batch_sharding = mesh_lib.batch_sharding(mesh)
    schedule = learning_rate_schedule(spec.optimizer, spec.num_train_steps)
    fed_rate = (None,) if feeds_rate(spec) else ()  # the host's rate
    train_step = objective.make_train_step(spec.objective, built.model, built.tx, schedule,
                                           masking, word_starts, seed=spec.seed,
                                           grad_accum_steps=spec.grad_accum_steps)
    train = jax.jit(train_step, in_shardings=(built.shardings, batch_sharding, *fed_rate),
                    out_shardings=(built.shardings, None), donate_argnums=0)
    eval_step = objective.make_eval_step(spec.objective, built.model, masking, word_starts,
                                         seed=spec.seed, seq_len=spec.seq_len)
    evaluate = jax.jit(eval_step, in_shardings=(built.shardings.params, batch_sharding, None))
    return train, evaluate


def flops_per_step(spec: StepSpec, built: PretrainState, max_predictions: int) -> float:
    """Model FLOPs of one training step of this spec (both models for ELECTRA)."""
    return objective.flops_per_step(built.model, spec.batch_size, spec.seq_len,
                                    max_predictions)


def abstract_batch(spec: StepSpec) -> dict:
    """The shapes of one global train batch (what PretrainBatches yields)."""
    shape = jax.ShapeDtypeStruct((spec.batch_size, spec.seq_len), jnp.int32)
    return {'input_ids': shape, 'segment_ids': shape}


def abstract_step_args(spec: StepSpec, built: PretrainState) -> tuple:
    """The train step's arguments as ShapeDtypeStructs, for `.lower(...)`."""
    rate = (jax.ShapeDtypeStruct((), jnp.float32),) if feeds_rate(spec) else ()
    return (built.abstract, abstract_batch(spec), *rate)
