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
import ml_collections
import optax
from jax.sharding import AbstractMesh

from engine import mesh as mesh_lib
from engine.optim import learning_rate_schedule, make_optimizer
from engine.step import TrainState
from pretrain import objective, sections, steps
from pretrain.masking import MaskingConfig


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


def build(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | AbstractMesh,
          model_cfg: Any) -> PretrainState:
    """The run's model (`objective`'s), optimizer and abstract sharded state on `mesh` (a
    device mesh, or an AbstractMesh: a dry run of a cluster's shape; nothing allocated)."""
    model = objective.build_model(cfg, model_cfg)
    tx = make_optimizer(sections.optimizer_config(cfg), cfg.num_train_steps)
    init = functools.partial(steps.init_state, jax.random.key(cfg.seed), model, tx, cfg.seq_len)
    with _tracing_context(mesh, cfg.mesh.rules):
        boxed = jax.eval_shape(init)
    logical = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, cfg.mesh.rules)
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


def checkpoint_meta(cfg: ml_collections.ConfigDict, position: int, **extra: Any) -> dict:
    """A pretraining checkpoint's JSON side item: where its data stands (`position`: batches
    consumed, NaN-skipped ones included), the config it was made with and `extra` (budget,
    imported_from). Resume checks read it back (pretrain/train.py)."""
    return {'data': {'seed': cfg.seed, 'batch_size': cfg.batch_size, 'position': position},
            'config': cfg.to_dict(), **extra}


def fresh_state(built: PretrainState) -> TrainState:
    """A sharded fresh init (call inside the run's sharding context)."""
    return jax.jit(lambda: nn.unbox(built.init()), out_shardings=built.shardings)()


def feeds_rate(cfg: ml_collections.ConfigDict) -> bool:
    """schedule='budget': the host passes the learning rate as a third step argument."""
    return cfg.optimizer.schedule == 'budget'


def compile_steps(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  built: PretrainState, masking: MaskingConfig,
                  word_starts: jax.Array | None) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step."""
    batch_sharding = mesh_lib.batch_sharding(mesh)
    schedule = learning_rate_schedule(sections.optimizer_config(cfg), cfg.num_train_steps)
    fed_rate = (None,) if feeds_rate(cfg) else ()  # the host's rate
    train = jax.jit(
        objective.make_train_step(cfg, built.model, built.tx, schedule, masking, word_starts),
        in_shardings=(built.shardings, batch_sharding, *fed_rate),
        out_shardings=(built.shardings, None), donate_argnums=0)
    evaluate = jax.jit(objective.make_eval_step(cfg, built.model, masking, word_starts),
                       in_shardings=(built.shardings.params, batch_sharding, None))
    return train, evaluate


def abstract_batch(cfg: ml_collections.ConfigDict) -> dict:
    """The shapes of one global train batch (what PretrainBatches yields)."""
    shape = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    return {'input_ids': shape, 'segment_ids': shape}


def abstract_step_args(cfg: ml_collections.ConfigDict, built: PretrainState) -> tuple:
    """The train step's arguments as ShapeDtypeStructs, for `.lower(...)`."""
    rate = (jax.ShapeDtypeStruct((), jnp.float32),) if feeds_rate(cfg) else ()
    return (built.abstract, abstract_batch(cfg), *rate)
