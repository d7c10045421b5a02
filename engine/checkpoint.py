"""Checkpoints: orbax, async, atomic; restore onto any mesh by giving target shardings."""

import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from engine import distributed
from engine.errors import CheckpointSaveFailed, ConfigError
from engine.paths import absolute_path
from engine.rundir import step_dirs


def saved_steps(directory: epath.Path, init_step: int = 0) -> list[int]:
    """The steps saved in a run's checkpoint `directory`, to start another run from; a
    one-line ConfigError if there is none, or not `init_step` (0 = any)."""
    saved = step_dirs(directory)
    if not saved or (init_step and init_step not in saved):
        wanted = f'step {init_step}' if init_step else 'any step'
        raise ConfigError(f'init_step: no checkpoint of {wanted} in {directory} (have {saved})')
    return saved


class _OrbaxFailures(logging.Filter):
    """Drops orbax's own logs of a failed background save (logged with its whole traceback
    by the save thread, then by the wait that raises it): Checkpoints raises that error
    itself, as one line. Orbax's other logs pass."""

    SITES = ('_thread_func', 'wait_until_finished', '_finalize_checkpoint')

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.levelno >= logging.ERROR
                    and record.funcName in self.SITES
                    and f'{os.sep}orbax{os.sep}' in record.pathname)


def _quiet_orbax_failures() -> None:
    absl_logger = logging.getLogger('absl')  # orbax logs through absl
    if not any(isinstance(f, _OrbaxFailures) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxFailures())


class Checkpoints:
    """Train state + a JSON side item (data position, resolved config) per step.

    Orbax writes each step into a temporary directory and renames it when complete, so a
    run killed mid-save (even with SIGKILL) leaves the previous checkpoints intact and
    the half-written one is ignored. A save that fails (disk full) raises
    CheckpointSaveFailed, one line; orbax deletes old checkpoints only after a save has
    succeeded, so the earlier ones stay. A checkpoint damaged on disk is skipped by
    `restore_latest`. The half-written directories of saves killed midway are removed when
    the next run opens the directory.
    """

    def __init__(self, directory: str, keep: int | None = 3, async_save: bool = True):
        """keep: how many of the newest steps orbax keeps; None = all (`delete` prunes)."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.directory = absolute_path(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=('state', 'meta'))
        self._unconfirmed = None  # step of the last save, until it is known to be on disk
        _quiet_orbax_failures()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def delete(self, step: int) -> None:
        """Removes checkpoint `step` (every process calls it)."""
        self._manager.delete(step)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an async save; returns once device buffers are copied out. Raises
        CheckpointSaveFailed if this save, or the previous one (in the background), failed."""
        self.check(wait=True)  # orbax would wait for the previous save here anyway
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            raise self._save_failed(step, e) from e
        self._unconfirmed = step

    def check(self, wait: bool = False) -> None:
        """Raises CheckpointSaveFailed if the last save failed in the background. wait:
        block until it is on disk; otherwise look only if it has already finished (cheap:
        the loop asks after every step, so a failure stops the run at once). With several
        processes every one calls it at the same point: they compare, and one whose own
        save went well stops with PeerFailed."""
        failure = self._failure(wait)
        if jax.process_count() > 1 and distributed.agree(failure is not None)[0]:
            failure = failure or distributed.PeerFailed(
                'a checkpoint save failed on another process; its log has the error')
        if failure is not None:
            raise failure

    def _failure(self, wait: bool) -> CheckpointSaveFailed | None:
        """This process's CheckpointSaveFailed for the last save, if it failed."""
        if self._unconfirmed is None or not wait and self._manager.is_saving_in_progress():
            return None
        step, self._unconfirmed = self._unconfirmed, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            failure = self._save_failed(step, e)
            failure.__cause__ = e
            return failure
        return None

    def _save_failed(self, step: int, error: Exception) -> CheckpointSaveFailed:
        try:
            kept = [s for s in step_dirs(self.directory) if s < step]
        except Exception:  # the storage itself failing
            kept = None
        last = (f'its last good checkpoint is step {kept[-1]}' if kept
                else 'with no checkpoint saved before' if kept is not None
                else f'see {self.directory} for the checkpoints kept')
        return CheckpointSaveFailed(
            f'could not save the checkpoint of step {step} ({_describe(error)}); '
            f'the run stopped, {last}')

    def restore_latest(self, abstract_state: Any, shardings: Any,
                       template_for: Callable[[int], tuple[Any, Any]] | None = None
                       ) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that restores; None if there is none.
        `template_for(step)` -> (abstract state, shardings), when the state's structure
        depends on the step (gradual unfreezing), replaces the two arguments.

        A newer one that does not restore while an older one does is damaged (a truncated
        array file, a missing _METADATA, a torn meta): it is moved aside to corrupt-STEP,
        never deleted, and one line on stderr says so. If none restores, nothing is moved
        and the newest one's error is raised as it is: a config that no longer matches the
        checkpoints, not damage, is then the likely cause.
        """
        failures = []  # (step, why) of the newer ones that did not restore
        for step in sorted(self.all_steps(), reverse=True):
            if template_for is not None:
                abstract_state, shardings = template_for(step)
            try:
                state, meta = self.restore(step, abstract_state, shardings)
                error = None
            except Exception as e:  # any damage: OSError, ValueError, JSONDecodeError, ...
                error = e
                _quiet_abandoned_reads()
            # Every process must take the same step (each reads its own shards).
            if not distributed.agree(error is not None)[0]:
                break
            failures.append((step, error))
        else:
            if not failures:
                return None
            newest = failures[0][1]
            if newest is None:
                raise distributed.PeerFailed('no checkpoint restores on another process; '
                                             'its log has the error')
            raise newest
        for bad, error in failures:
            why = self._missing_file(bad) or (
                _describe(error).replace(f'{self.directory}/', '') if error is not None
                else 'unreadable on another process')
            moved = self._move_aside(bad)
            if jax.process_index() == 0:
                print(f'checkpoint {bad} is unreadable ({why}); moved to '
                      f'{self.directory.name}/{moved}, resuming from step {step}',
                      file=sys.stderr, flush=True)
        if failures:
            self._manager.reload()
        return step, state, meta

    def _missing_file(self, step: int) -> str | None:
        """Why `step` is damaged when a file orbax needs is missing (its own error then names
        a pytree mismatch instead)."""
        for name in ('state/_METADATA', 'meta/metadata'):
            if not (self.directory / str(step) / name).exists():
                return f'{name} is missing'
        return None

    def _move_aside(self, step: int) -> str:
        """Renames checkpoint `step` to corrupt-STEP (corrupt-STEP.2, ... if taken), out of
        orbax's sight; returns the new name. Process 0 renames, every process waits."""
        name, n = f'corrupt-{step}', 1
        while (self.directory / name).exists():
            n += 1
            name = f'corrupt-{step}.{n}'
        distributed.barrier(f'checkpoint-aside-{step}-named')  # all looked before it moves
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(self.directory / name)
        distributed.barrier(f'checkpoint-aside-{step}-moved')
        return name

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
        """Blocks until pending async saves are on disk; CheckpointSaveFailed if one failed."""
        self.check(wait=True)

    def close(self) -> None:
        """Waits for the last save (CheckpointSaveFailed if it failed), then closes. This
        process alone: it runs on the way out of errors too, where the others may not be."""
        failure = self._failure(wait=True)
        self._manager.close()  # an error already raised is not raised again
        if failure is not None:
            raise failure


def _quiet_abandoned_reads() -> None:
    """A restore that fails leaves TensorStore reads in flight; each then calls back into
    orbax's event loop, already closed, and Python prints that traceback (hundreds of
    lines with several devices). Those are dropped; other unraisable errors print as ever."""
    previous = sys.unraisablehook
    if getattr(previous, 'drops_abandoned_reads', False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'):
            previous(unraisable)
    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


def _describe(error: BaseException) -> str:
    """One short line for an exception: the innermost cause's first line ('[Errno 28] No
    space left on device'; other types than OSError named), at most ~200 characters (the
    middle of a longer one left out: a TensorStore error says what is wrong at its end)."""
    while error.__cause__ is not None:
        error = error.__cause__
    # TensorStore appends its whole JSON spec: what went wrong comes just before it.
    message = re.sub(r'\s*\[(tensorstore_spec|source locations)=.*', '', str(error), flags=re.S)
    lines = message.strip().splitlines()
    text = lines[0] if lines else ''
    if not isinstance(error, OSError) or not text:
        text = f'{type(error).__name__}: {text}' if text else type(error).__name__
    return text if len(text) <= 200 else f'{text[:110]} ... {text[-85:]}'


def _read_handlers() -> dict:
    # A handler for 'meta' too: without one, orbax warns on every read that it cannot
    # restore the item (which these readers never ask for).
    return {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}


def read_state_numpy(directory: str, step: int | None = None) -> dict:
    """A checkpoint's whole state as nested dicts of host numpy arrays, on any device count
    (for tests, export, prediction and inspection; no mesh needed)."""
    manager = ocp.CheckpointManager(absolute_path(directory), item_names=('state', 'meta'),
                                    item_handlers=_read_handlers())
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


def read_meta_and_shapes(directory: epath.Path, step: int) -> tuple[dict, dict[str, tuple]]:
    """(JSON side item, {param path: shape}) of a checkpoint; nothing written into it."""
    manager = ocp.CheckpointManager(directory, item_names=('state', 'meta'),
                                    item_handlers=_read_handlers())
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        params = manager.item_metadata(step)['state']['params']
    finally:
        manager.close()
    return meta, flat_shapes(params)


def flat_shapes(tree: Any) -> dict[str, tuple]:
    """{'a/b/c': shape} of every leaf of a params tree (arrays or their metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


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


def subtree_reader(directory: str, step: int | None) -> Callable[[dict], dict]:
    """read(target) -> `restore_subtree(directory, step, target)`: one checkpoint as the
    reader models.load.load takes (the model never imports the checkpoint format)."""
    return functools.partial(restore_subtree, directory, step)
