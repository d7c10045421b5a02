"""Gradual unfreezing (Howard & Ruder 2018, ULMFiT), as phases of the fine-tuning run.

With `gradual_unfreeze_steps = N > 0`, training starts with only the head (pooler and
classifier) trainable; every N steps the next encoder layer from the top joins, and after
the top layer L the embeddings: phase k (k = 0 .. L+1) trains the parameters of
`freeze.layer_depth` <= k. Parameters that `freeze` freezes stay frozen throughout.

Each phase is an ordinary multi_transform split (frozen leaves: no gradient, no optimizer
state), so a phase change builds the next phase's optimizer: Adam's moments restart (for
the layers already training too; bias correction then treats every leaf alike), and the
learning-rate schedule continues from the global step. A checkpoint at step s holds the
optimizer state of the phase that made step s, `phase_of_state(s)`, so resuming rebuilds
that structure first and then moves on.
"""

from typing import Any

import jax
import optax

from engine.step import FROZEN, TRAIN
from finetune.freeze import freeze_labels
from models.paths import layer_depth, path_of


def num_phases(num_layers: int) -> int:
    return num_layers + 2  # head only, + each layer, + embeddings


def phase_of_step(step: int, every: int, num_layers: int) -> int:
    """The phase that takes the step from `step` to `step + 1` (0-based)."""
    if every <= 0:
        return num_phases(num_layers) - 1  # off: everything trains from the start
    return min(step // every, num_phases(num_layers) - 1)


def phase_of_state(step: int, every: int, num_layers: int) -> int:
    """The phase whose optimizer state a checkpoint at `step` holds."""
    return phase_of_step(max(step - 1, 0), every, num_layers)


def segments(start: int, total: int, every: int, num_layers: int) -> list[tuple[int, int]]:
    """[(phase, end step)] covering steps start .. total, one entry per phase touched."""
    out = []
    step = start
    while step < total:
        phase = phase_of_step(step, every, num_layers)
        last = phase == num_phases(num_layers) - 1
        end = total if last else min(total, (phase + 1) * every)
        out.append((phase, end))
        step = end
    return out


def phase_labels(params: Any, freeze: str, num_layers: int, phase: int) -> Any:
    """`freeze`'s labels with everything deeper than `phase` frozen as well."""
    base = freeze_labels(params, freeze, num_layers)
    return jax.tree_util.tree_map_with_path(
        lambda kp, label: TRAIN if label == TRAIN and layer_depth(path_of(kp), num_layers)
        <= phase else FROZEN, base)


def continue_schedule(opt_state: Any, step: int) -> Any:
    """A fresh optimizer state whose learning-rate schedule resumes at `step`."""
    def advance(node):
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=jax.numpy.full_like(node.count, step))
        return node
    return jax.tree.map(advance, opt_state,
                        is_leaf=lambda n: isinstance(n, optax.ScaleByScheduleState))
