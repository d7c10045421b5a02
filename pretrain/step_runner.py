"""The pretraining train step on synthetic batches, compiled once and timed.

Shared by `pretrain.benchmark` (one config) and `pretrain.benchmark_suite` (the GPU grid):
the same jitted step and sharded state `launch.py pretrain` uses, on full-length batches.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from engine import mesh as mesh_lib
from models.flops import count_params
from pretrain import state as state_lib
from pretrain.sections import bert_config, masking_config, step_spec

# The custom-call targets of jax's cuDNN fused attention all start with this.
CUDNN_ATTENTION_CALL = '__cudnn$fmha'


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Full sequences of random ordinary tokens framed by [CLS] ... [SEP]."""
    ids = np.random.default_rng(seed).integers(5, vocab_size, (batch_size, seq_len), np.int32)
    ids[:, 0], ids[:, -1] = 2, 3
    return {'input_ids': ids, 'segment_ids': np.ones_like(ids)}


def build_step(cfg, devices=None):
    """The same jitted train step and sharded state `launch.py pretrain` uses (built by
    pretrain/state.py), on a mesh over `devices` (default: all). Returns (mesh, state,
    step, model FLOPs per step, the step's arguments after the batch)."""
    mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes, devices)
    spec = step_spec(cfg)
    built = state_lib.build(spec, mesh)
    masking = masking_config(cfg, spec.model.vocab_size)
    with mesh_lib.sharding_context(mesh, spec.rules):
        state = state_lib.fresh_state(built)
        step, _ = state_lib.compile_steps(spec, mesh, built, masking, word_starts=None)
    # schedule=budget: the host passes the rate; the peak stands in for it.
    extra = ((jnp.float32(spec.optimizer.learning_rate),) if state_lib.feeds_rate(spec)
             else ())
    flops = state_lib.flops_per_step(spec, built, masking.max_predictions)
    return mesh, state, step, flops, extra


class JaxRunner:
    """Compiles the step once (ahead of time, so its memory analysis is free) and times it.

    `compile_seconds` is the step's lowering plus XLA compile; `cudnn_attention` says
    whether the lowered step calls cuDNN's fused attention (it falls back to XLA silently).
    """

    def __init__(self, cfg, devices=None):
        self.cfg = cfg
        self.model_config = bert_config(cfg)
        self.mesh, self.state, step, self.flops, self.extra = build_step(cfg, devices)
        self.batch = mesh_lib.shard_batch(
            synthetic_batch(cfg.batch_size, cfg.seq_len, cfg.model.vocab_size), self.mesh)
        start = time.perf_counter()
        with mesh_lib.sharding_context(self.mesh, cfg.mesh.rules):
            lowered = step.lower(self.state, self.batch, *self.extra)
            self.step = lowered.compile()
        self.compile_seconds = time.perf_counter() - start
        self.cudnn_attention = CUDNN_ATTENTION_CALL in lowered.as_text()
        self.params = count_params(self.state.params)

    def run(self, num_steps: int) -> float:
        """Seconds per step over `num_steps` steps; metrics are fetched once, at the end."""
        start = time.perf_counter()
        for _ in range(num_steps):
            self.state, metrics = self.step(self.state, self.batch, *self.extra)
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / num_steps

    def memory(self) -> dict:
        """Bytes: XLA's static estimate of the step, and the device's peak where it has one."""
        out = {}
        analysis = self.step.memory_analysis()
        if analysis is not None:
            out['compiled'] = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                               - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
            out['temp'] = analysis.temp_size_in_bytes
        stats = self.mesh.devices.flat[0].memory_stats() or {}
        if 'peak_bytes_in_use' in stats:
            out['device_peak'] = stats['peak_bytes_in_use']
        return out
