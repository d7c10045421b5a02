"""`--dry-run --compile-for=TOPOLOGY`: compile a run's train step for a TPU slice here.

With `libtpu` installed (the [tpu-compile] extra), XLA compiles for abstract TPU devices with
no TPU present: `jax.experimental.topologies.get_topology_desc` gives a slice's devices,
the step is lowered with ShapeDtypeStructs (nothing allocated) and compiled, and the
compiled executable reports memory per device (`memory_analysis`) and FLOPs and an estimated
time per device (`cost_analysis`). The estimate is the compiler's cost model, not a
measurement.

A v4 topology's devices are TensorCores (two per chip, as compiled here); v5e, v5p and v6e
have one per chip. Memory and peak FLOP/s are per device accordingly.
"""

import dataclasses
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax

from engine.errors import ConfigError
from engine.extras import require
from models.attention import resolve_attention_impl

GiB = 1024 ** 3

# HBM (GiB) and dense bf16 peak FLOP/s per chip: Google Cloud TPU spec sheets.
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}
PEAK_BF16 = {'v4': 275e12, 'v5e': 197e12, 'v5p': 459e12, 'v6e': 918e12}
# libtpu asks for an accelerator type at start-up; any valid one quiets it (the topology
# itself comes from the name given).
_ACCELERATOR_TYPES = {'v4': 'v4-8', 'v5e': 'v5litepod-4', 'v5p': 'v5p-8', 'v6e': 'v6e-4'}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # e.g. 'v5e:16x16'
    generation: str  # 'v5e'
    devices: list
    cores_per_chip: int

    @property
    def hbm_bytes(self) -> float:
        return HBM_GIB[self.generation] * GiB / self.cores_per_chip

    @property
    def peak_flops(self) -> float:
        return PEAK_BF16[self.generation] / self.cores_per_chip


def prepare_environment(generation: str = 'v5e') -> None:
    """Before JAX starts a backend: CPU as the default platform (a dry run runs nothing),
    and libtpu's start-up settings that keep it quiet and let several processes load it.
    Values already set are kept."""
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', _ACCELERATOR_TYPES.get(generation, 'v5litepod-4'))
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')  # no metadata server off Cloud TPU VMs
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # its lock file is per machine
    if not os.environ.get('JAX_PLATFORMS'):
        jax.config.update('jax_platforms', 'cpu')


def target(name: str) -> Target:
    """The abstract devices of topology `name` ('v5e:2x2', 'v4:2x2x4', ...)."""
    generation = name.split(':')[0]
    if generation not in HBM_GIB or ':' not in name:
        raise ConfigError(f'--compile-for: {name!r} is not GENERATION:TOPOLOGY with a '
                          f'generation of {sorted(HBM_GIB)}, e.g. v5e:16x16 or v4:2x2x4')
    prepare_environment(generation)
    require('libtpu', '--compile-for')
    from jax.experimental import topologies
    try:
        devices = topologies.get_topology_desc(platform='tpu', topology_name=name).devices
    except Exception as e:  # libtpu's own message: an unknown or uneven topology
        raise ConfigError(f'--compile-for: {name!r}: {str(e).splitlines()[0]}') from None
    chips = len({tuple(d.coords) for d in devices})
    return Target(name, generation, list(devices), len(devices) // chips)


def for_tpu(model_cfg: Any) -> Any:
    """The model config with its attention kernel resolved for a TPU, not for this host:
    the layer resolves 'auto' from `jax.default_backend()`, which is the CPU here, so the
    compiled step would otherwise take the CPU's kernel (xla) where a TPU run takes splash.
    The training dropout rate decides, as in the train step (dropout > 0: explicit)."""
    impl = resolve_attention_impl(model_cfg.attention_impl, 'tpu',
                                  model_cfg.attention_dropout_rate, model_cfg.compute_dtype)
    return dataclasses.replace(model_cfg, attention_impl=impl)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Per-device figures of one compiled train step."""
    argument: int  # inputs: state + batch (donated state aliases the outputs)
    output: int
    alias: int
    temp: int  # XLA's temporaries: activations, gradients, fusion buffers
    code: int
    flops: float
    seconds: float | None  # the compiler's estimate
    kernels: tuple = ()  # Pallas (Mosaic) kernels in the compiled program, e.g. splash's

    @property
    def total(self) -> int:
        """Peak live bytes: arguments + outputs not aliased onto them + temporaries + code."""
        return self.argument + self.output - self.alias + self.temp + self.code


def compile_step(jitted: Callable, args: tuple, target_: Target, advice: str) -> Compiled:
    """Lowers and compiles `jitted` for `args` (ShapeDtypeStructs) and reads its analyses.
    The TPU compiler itself refuses a program whose temporaries exceed HBM: that is a
    ConfigError naming what to change (`advice`), like one that compiles but does not fit."""
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        said = str(e).split('RESOURCE_EXHAUSTED:', 1)[-1].strip().splitlines()[0].rstrip('.')
        raise ConfigError(f'does not fit on {target_.name}: the compiler says: {said}; '
                          f'{advice}') from None
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return Compiled(memory.argument_size_in_bytes, memory.output_size_in_bytes,
                    memory.alias_size_in_bytes, memory.temp_size_in_bytes,
                    memory.generated_code_size_in_bytes, float(cost.get('flops', 0.0)),
                    _positive(cost.get('optimal_seconds')), mosaic_kernels(compiled.as_text()))


def mosaic_kernels(hlo: str) -> tuple[str, ...]:
    """Names of the Pallas TPU kernels a compiled program calls (sorted, distinct): the
    instruction names of its `tpu_custom_call`s, e.g. 'splash_mha_fwd_segmented'."""
    names = set()
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' in line:
            match = re.match(r'\s*(?:ROOT\s+)?%?([\w-]+?)(?:\.\d+)*\s*=', line)
            names.add(match.group(1) if match else 'tpu_custom_call')
    return tuple(sorted(names))


def _positive(seconds: float | None) -> float | None:
    """The compiler's time estimate; a non-positive one (its cost model gave up) is None."""
    return seconds if seconds is not None and seconds > 0 else None


def fits(target_: Target, compiled: Compiled) -> bool:
    return compiled.total <= target_.hbm_bytes


def report(target_: Target, compiled: Compiled, sizes: dict, counted_flops: float) -> list[str]:
    """The printed lines: memory per device against HBM, FLOPs, the estimated step time."""
    n = len(target_.devices)
    gib = lambda b: f'{b / GiB:.3f} GiB'  # noqa: E731
    lines = [f'compiled for {target_.name}: {n} devices ({target_.devices[0].device_kind}, '
             f'{target_.cores_per_chip} per chip), {gib(target_.hbm_bytes)} HBM and '
             f'{target_.peak_flops / 1e12:.0f} TFLOP/s bf16 peak per device']
    lines.append('state/device: ' + ', '.join(f'{k} {gib(v)}' for k, v in sizes.items()))
    lines.append(f'compiled/device: arguments {gib(compiled.argument)}, outputs '
                 f'{gib(compiled.output)} (aliased {gib(compiled.alias)}), temporaries '
                 f'{gib(compiled.temp)}, code {gib(compiled.code)}')
    per_device = counted_flops / n
    ratio = compiled.flops / per_device if per_device else math.nan
    lines.append(f'flops/device: compiled {compiled.flops:.3e}, counted (models/flops.py) '
                 f'{per_device:.3e} (x{ratio:.2f})')
    if compiled.seconds:
        mfu = per_device / compiled.seconds / target_.peak_flops
        lines.append(f'step time (the compiler\'s estimate, not a measurement): '
                     f'{compiled.seconds * 1e3:.1f} ms, MFU {100 * mfu:.1f}% of bf16 peak')
    else:
        lines.append('step time: the compiler gave no estimate for this program')
    lines.append('pallas kernels: ' + (', '.join(compiled.kernels) or 'none'))
    verdict = 'fits' if fits(target_, compiled) else 'does NOT fit'
    lines.append(f'total/device: {gib(compiled.total)} of {gib(target_.hbm_bytes)} HBM: '
                 f'{verdict}')
    return lines


def check_fits(target_: Target, compiled: Compiled, advice: str) -> None:
    """ConfigError (one line, exit code 2) when the step needs more HBM than a device has."""
    if not fits(target_, compiled):
        raise ConfigError(f'does not fit: {compiled.total / GiB:.2f} GiB per device > '
                          f'{target_.hbm_bytes / GiB:.2f} GiB HBM on {target_.name}; {advice}')


def mfu(target_: Target, compiled: Compiled, counted_flops: float) -> float | None:
    """Model-FLOPs utilisation implied by the compiler's estimated step time."""
    if not compiled.seconds:
        return None
    return counted_flops / len(target_.devices) / compiled.seconds / target_.peak_flops
