"""Peak FLOP/s per device, for model-FLOPs utilisation (MFU).

MFU is reported only against a stable peak: the chip's dense bf16 spec, looked up by
`device_kind`, or `peak_flops_per_device` set in the config. A CPU has no such figure (its
throughput depends on the cores, the vector units and whatever else runs), so training on
CPU logs no MFU; `python -m pretrain.benchmark` measures a matmul in the same run instead
and reports the step against it.
"""

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip (bf16 on accelerators), from vendor specs; the longest
# matching prefix of a device's `device_kind` wins.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'NVIDIA H100': 989e12,  # SXM
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100': 312e12,
    'NVIDIA L4': 121e12,
}


def known_peak_flops(device_kind: str) -> float | None:
    """The spec peak of a device kind (longest matching prefix), or None if unknown."""
    matches = [name for name in PEAK_FLOPS if device_kind.startswith(name)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def measured_matmul_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the default device (best of `repeats`): the
    benchmark's same-run reference on CPU, never a training run's MFU peak."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(override: float = 0.0) -> float | None:
    """`override` if set, else the chip's spec; None where neither exists (CPU): no MFU."""
    if override:
        return float(override)
    return known_peak_flops(jax.devices()[0].device_kind)


def total_peak_flops(override: float = 0.0) -> float | None:
    """The peak of all devices of the run together (None: unknown, no MFU)."""
    peak = peak_flops_per_device(override)
    return None if peak is None else peak * jax.device_count()
