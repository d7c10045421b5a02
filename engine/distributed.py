"""Multi-process set-up: one JAX process per host (TPU VM worker, SLURM task), or per
`--process-id` given by hand.

`initialize(args)` must run before anything touches a JAX device. In order:
  1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (all three);
  2. automatic: `jax.distributed.initialize()` with no arguments, which reads the
     cluster from the environment, when this is a Cloud TPU VM (a Google TPU on the
     PCI bus, or TPU_WORKER_HOSTNAMES / MEGASCALE_COORDINATOR_ADDRESS set) or a SLURM
     step with more than one task (SLURM_JOB_ID and SLURM_NTASKS > 1);
  3. otherwise a single process.
Every process then runs the same program on the global mesh: process 0 alone writes
metrics, TensorBoard, config.json and the progress bar; every process writes its own
checkpoint shards (orbax coordinates them).
"""

import argparse
import contextlib
import glob
import os
import pathlib
from collections.abc import Iterator, Mapping

import jax

from engine.errors import ConfigError, PeerFailed

GOOGLE_PCI_VENDOR = '0x1ae0'  # TPU chips on a Cloud TPU VM (what JAX itself checks)



def detect(environ: Mapping[str, str] | None = None) -> str:
    """'tpu', 'slurm' or 'single': what automatic set-up would do here."""
    environ = os.environ if environ is None else environ
    # One worker host (a single-host slice, or --compile-for's setting) needs no joining.
    hosts = [h for h in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h.strip()]
    if len(hosts) > 1 or environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
        return 'tpu'
    if environ.get('SLURM_JOB_ID') and int(environ.get('SLURM_NTASKS', '1') or 1) > 1:
        return 'slurm'
    if environ is os.environ and _google_tpu_on_pci():
        return 'tpu'
    return 'single'


def _google_tpu_on_pci() -> bool:
    for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
        with contextlib.suppress(OSError):
            if pathlib.Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
    return False


def explicit_settings(args: argparse.Namespace) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the flags, None if none was given."""
    coordinator = getattr(args, 'coordinator', '')
    count, index = getattr(args, 'num_processes', 0), getattr(args, 'process_id', -1)
    given = [bool(coordinator), count > 0, index >= 0]
    if not any(given):
        return None
    if not all(given):
        raise ConfigError('--coordinator, --num-processes and --process-id go together')
    if not 0 <= index < count:
        raise ConfigError(f'--process-id: {index} is not in [0, {count})')
    return coordinator, count, index


def initialize(args: argparse.Namespace) -> str:
    """Joins the processes of this run (see the module docstring); returns the mode."""
    settings = explicit_settings(args)
    if settings is not None:
        coordinator, count, index = settings
        if count > 1:
            # CPU collectives across processes (harmless for GPU/TPU, which bring theirs).
            jax.config.update('jax_cpu_collectives_implementation', 'gloo')
            jax.distributed.initialize(coordinator, num_processes=count, process_id=index)
        return 'explicit'
    mode = detect()
    if mode != 'single':
        jax.distributed.initialize()
    return mode


def is_main() -> bool:
    return jax.process_index() == 0


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def broadcast_int(value: int) -> int:
    """Process 0's `value` on every process (a collective)."""
    if jax.process_count() == 1:
        return int(value)
    import numpy as np
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(np.array([value], np.int64))
    return int(np.asarray(gathered).reshape(-1)[0])


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_first(name: str) -> Iterator[None]:
    """Process 0 runs the body first (e.g. trains the tokenizer, builds the TFDS data);
    the others wait, then run it and find the files made. With a workdir every host
    sees, the others only read; with host-local disks each host builds its own. If the
    body fails on process 0, the others stop with an error instead of waiting for ever."""
    if not is_main():
        (failed,) = agree(False)
        if failed:
            raise PeerFailed(f'process 0 failed in {name!r}; its own log has the error')
        yield
        return
    try:
        yield
    except BaseException:
        agree(True)
        raise
    agree(False)


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on every process if it is true on any (a collective: every process
    must call it at the same point)."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    import numpy as np
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(np.array(flags, np.int32))
    return tuple(bool(v) for v in np.asarray(gathered).reshape(-1, len(flags)).any(axis=0))
