"""Peak FLOP/s per device, for model-FLOPs utilisation (MFU)."""

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip (bf16 on accelerators), from vendor specs.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100': 312e12,
}


def measured_matmul_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the default device (best of `repeats`)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(override: float = 0.0) -> float:
    """`override` if set; the chip's spec if known; else a measured matmul (CPU).

    On CPU all host devices share the same cores, so the measured peak is divided among
    them (fake multi-device CPU runs report per-device MFU honestly).
    """
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if kind.startswith(name):
            return flops
    return measured_matmul_flops() / jax.local_device_count()
