"""Checkpoints: orbax, async, atomic; restore onto any mesh by giving target shardings."""

import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from engine.config_cli import ConfigError
from engine.paths import absolute_path


def step_dirs(directory: epath.Path) -> list[int]:
    """The steps of the finished checkpoints in `directory`, ascending ([] if none)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def saved_steps(directory: epath.Path, init_step: int = 0) -> list[int]:
    """The steps saved in a run's checkpoint `directory`, to start another run from; a
    one-line ConfigError if there is none, or not `init_step` (0 = any)."""
    saved = step_dirs(directory)
    if not saved or (init_step and init_step not in saved):
        wanted = f'step {init_step}' if init_step else 'any step'
        raise ConfigError(f'init_step: no checkpoint of {wanted} in {directory} (have {saved})')
    return saved


class Checkpoints:
    """Train state + a JSON side item (data position, resolved config) per step.

    Orbax writes each step into a temporary directory and renames it when complete, so a
    run killed mid-save (even with SIGKILL) leaves the previous checkpoints intact and
    the half-written one is ignored.
    """

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.directory = absolute_path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=('state', 'meta'))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an async save; returns once device buffers are copied out. A failure of
        an earlier async save is raised here, not left in a background thread's log."""
        self._manager.check_for_errors()
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, dict]:
        """Restores `step` laid out by `shardings` (any mesh), with its JSON meta."""
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state, shardings)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def restore_meta(self, step: int) -> dict:
        return self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def read_state_numpy(directory: str, step: int | None = None) -> dict:
    """A checkpoint's whole state as nested dicts of host numpy arrays, on any device count
    (for tests, export, prediction and inspection; no mesh needed)."""
    manager = ocp.CheckpointManager(absolute_path(directory), item_names=('state', 'meta'),
                                    item_handlers={'state': ocp.StandardCheckpointHandler()})
    step = manager.latest_step() if step is None else step
    if step is None:
        manager.close()
        raise FileNotFoundError(f'no checkpoint in {directory}')
    # Every leaf onto one local device, whatever mesh or hosts wrote it (a checkpoint of a
    # multi-process run names devices this process does not have), then to host numpy.
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          manager.item_metadata(step)['state'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
    manager.close()
    return jax.tree.map(np.asarray, state)


def read_params_numpy(directory: str, step: int | None = None) -> dict[str, np.ndarray]:
    """A checkpoint's params as host numpy arrays keyed 'bert/encoder/...'."""
    state = read_state_numpy(directory, step)
    flat = jax.tree_util.tree_flatten_with_path(state['params'])[0]
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v) for path, v in flat}


def restore_subtree(directory: str, step: int | None, target: dict) -> dict:
    """Restores only the leaves named in `target` (a nested dict of ShapeDtypeStructs with
    shardings, mirroring the saved state), laid out on this run's mesh.

    Fine-tuning uses it to take `params/bert/...` from a pretraining checkpoint, leaving
    its MLM head and optimizer state unread.
    """
    manager = ocp.CheckpointManager(absolute_path(directory), item_names=('state', 'meta'))
    step = manager.latest_step() if step is None else step
    if step is None:
        manager.close()
        raise FileNotFoundError(f'no checkpoint in {directory}')
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))).state
    manager.close()
    return restored
