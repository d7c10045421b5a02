"""The train state and the one train step every stage uses.

A stage (pretraining, fine-tuning) supplies its loss as `loss_fn(params, batch, rng) ->
(objective, terms)`, where `terms` holds at least `loss_sum` and `weight_sum`. The step here
does the rest, the same way for every stage:

- the random key of step s is fold_in(key(seed), s), so a resumed run repeats exactly what
  an uninterrupted one computes; `prepare(batch, rng)` may transform the whole global batch
  first (masking) and return the key the loss uses;
- gradient accumulation: with `grad_accum_steps` = n > 1 the batch is cut into n
  micro-batches (row i of every device's shard to micro-batch i % n, so no data moves
  between devices) scanned with keys fold_in(rng, i), gradients and terms summed;
- frozen parameters: with `labels` ('train'/'frozen' per leaf, static), only the trainable
  half is differentiated - frozen gradients are never computed - and frozen values pass
  through untouched, so they stay bit-identical;
- gradients are divided by the summed `weight_sum` (a per-token objective such as MLM, whose
  micro-batches predict different numbers of tokens) or by n (an objective that is already a
  mean), then the optimizer steps;
- a learning rate given by the host (`learning_rate`, e.g. from the fraction of a wall-time
  budget spent, which no function of the step can know) replaces the one held in the
  optimizer state (optax.inject_hyperparams) before the update, and is the one logged.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

TRAIN, FROZEN = 'train', 'frozen'

Loss = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
Prepare = Callable[[dict, jax.Array], tuple[dict, jax.Array]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def check_label(label: Any) -> None:
    if label not in (TRAIN, FROZEN):
        raise ValueError(f'label {label!r} is neither {TRAIN!r} nor {FROZEN!r}')


def _keep(side: str):
    def pick(leaf, label):
        check_label(label)
        return leaf if label == side else None
    return pick


def split_params(params: Any, labels: Any) -> tuple[Any, Any]:
    """(trainable, frozen): trees of `params`' structure holding their own leaves and `None`
    in place of the other side's. Works on any tree of `params`' structure (grads, updates)."""
    return (jax.tree.map(_keep(TRAIN), params, labels),
            jax.tree.map(_keep(FROZEN), params, labels))


def merge_params(trainable: Any, frozen: Any) -> Any:
    """The inverse of `split_params`: each leaf from whichever side is not None."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)


def micro_batches(batch: dict, count: int) -> dict:
    """(B, ...) -> (count, B/count, ...), row i of every device's shard to micro-batch
    i % count, so the split needs no data movement between devices."""
    def split(x):
        x = x.reshape(x.shape[0] // count, count, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Loss, params: Any, batch: dict, rng: jax.Array,
                         count: int = 1) -> tuple[Any, dict]:
    """(summed gradients of the objective, summed terms) over `count` micro-batches."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if count == 1:
        return grad_fn(params, batch, rng)

    def micro_step(carry, xs):
        micro, index = xs
        out = grad_fn(params, micro, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, out), None

    first = jax.tree.map(lambda x: x[0], micro_batches(batch, count))
    shapes = jax.eval_shape(grad_fn, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, terms), _ = jax.lax.scan(micro_step, zeros,
                                     (micro_batches(batch, count), jnp.arange(count)))
    return grads, terms


def set_learning_rate(opt_state: Any, learning_rate: jax.Array) -> Any:
    """`opt_state` with every injected 'learning_rate' hyperparameter set to `learning_rate`;
    raises if it holds none (the optimizer was not built for a host-fed rate)."""
    found = []

    def is_injected(node):
        return isinstance(node, optax.InjectStatefulHyperparamsState | optax.InjectHyperparamsState)

    def replace(node):
        if not is_injected(node) or 'learning_rate' not in node.hyperparams:
            return node
        found.append(node)
        rate = jnp.asarray(learning_rate, node.hyperparams['learning_rate'].dtype)
        return node._replace(hyperparams={**node.hyperparams, 'learning_rate': rate})
    out = jax.tree.map(replace, opt_state, is_leaf=is_injected)
    if not found:
        raise ValueError('a learning rate was given but the optimizer state has no injected '
                         "'learning_rate' (build it with schedule='budget')")
    return out


def train_step(state: TrainState, batch: dict, learning_rate: jax.Array | None = None, *,
               loss_fn: Loss,
               tx: optax.GradientTransformation, schedule: Callable, seed: int,
               labels: Any = None, prepare: Prepare | None = None, grad_accum_steps: int = 1,
               per_weight: bool = False) -> tuple[TrainState, dict]:
    """One optimizer step on the global batch (see the module doc). `per_weight`: the
    objective is a sum over `weight_sum` items (divide by it), else already a mean."""
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if prepare is not None:
        batch, rng = prepare(batch, rng)
    if labels is None:
        trainable, frozen = state.params, None
        objective = loss_fn
    else:
        trainable, frozen = split_params(state.params, labels)
        def objective(trainable, batch, rng):  # noqa: E306 - frozen values are constants
            return loss_fn(merge_params(trainable, frozen), batch, rng)
    opt_state = state.opt_state
    if learning_rate is not None:
        opt_state = set_learning_rate(opt_state, learning_rate)
    grads, terms = accumulate_gradients(objective, trainable, batch, rng, grad_accum_steps)
    if per_weight:
        grads = jax.tree.map(lambda g: g / jnp.maximum(terms['weight_sum'], 1.0), grads)
    elif grad_accum_steps > 1:
        grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
    if frozen is None:
        updates, opt_state = tx.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    else:
        # Placeholders where the optimizer's frozen branch (set_to_zero) expects gradients.
        full_grads = merge_params(grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = tx.update(full_grads, opt_state, state.params)
        trainable = optax.apply_updates(trainable, split_params(updates, labels)[0])
        params = merge_params(trainable, frozen)
    rate = schedule(state.step) if learning_rate is None else learning_rate
    metrics = {**terms, 'grad_norm': optax.tree.norm(grads), 'learning_rate': rate}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics
