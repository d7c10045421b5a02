"""Train-step throughput: tokens/s and MFU for a config, on synthetic full-length batches.

    python -m pretrain.benchmark --config configs/pretrain.py:tiny
    python -m pretrain.benchmark --config configs/pretrain.py:mini --config.batch_size=32

Times the jitted step (forward, backward, AdamW update) after warm-up, repeats the
measurement and reports the median. MFU is model FLOPs (models/flops.py) per second over
the peak: the chip's spec on TPU/GPU, or a large fp32 matmul timed in this same run on CPU.
"""

import argparse
import functools
import math
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from engine import mesh as mesh_lib
from engine.config_cli import apply_overrides, load_config, split_config_args
from engine.hardware import measured_matmul_flops, peak_flops_per_device
from engine.optim import adamw, learning_rate_schedule
from models.bert import BertForMaskedLM
from models.flops import count_params, train_flops_per_step
from pretrain import steps
from pretrain.train import bert_config, masking_config


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Full sequences of random ordinary tokens framed by [CLS] ... [SEP]."""
    ids = np.random.default_rng(seed).integers(5, vocab_size, (batch_size, seq_len), np.int32)
    ids[:, 0], ids[:, -1] = 2, 3
    return {'input_ids': ids, 'segment_ids': np.ones_like(ids)}


def build_step(cfg):
    """The same jitted train step and sharded state `launch.py pretrain` uses."""
    mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    model_cfg = bert_config(cfg)
    model = BertForMaskedLM(model_cfg)
    tx = adamw(cfg.optimizer, cfg.num_train_steps)
    masking = masking_config(cfg, model_cfg.vocab_size)
    init = functools.partial(steps.init_state, jax.random.key(cfg.seed), model, tx, cfg.seq_len)
    with mesh_lib.sharding_context(mesh, cfg.mesh.rules):
        _, shardings = mesh_lib.abstract_and_shardings(init, mesh, cfg.mesh.rules)
        state = jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
        step = jax.jit(functools.partial(
            steps.train_step, model=model, tx=tx,
            schedule=learning_rate_schedule(cfg.optimizer, cfg.num_train_steps),
            masking=masking, word_starts=None, seed=cfg.seed,
            grad_accum_steps=cfg.grad_accum_steps),
            in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
            out_shardings=(shardings, None), donate_argnums=0)
    flops = train_flops_per_step(model_cfg, cfg.batch_size, cfg.seq_len, masking.max_predictions)
    return mesh, state, step, flops


def time_steps(cfg, num_steps: int, repeats: int) -> dict:
    mesh, state, step, flops = build_step(cfg)
    batch = mesh_lib.shard_batch(
        synthetic_batch(cfg.batch_size, cfg.seq_len, cfg.model.vocab_size), mesh)
    with mesh_lib.sharding_context(mesh, cfg.mesh.rules):
        for _ in range(3):  # compile + warm-up
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(num_steps):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - start) / num_steps)
    seconds = statistics.median(times)
    return {'params': count_params(state.params), 'step_seconds': seconds,
            'tokens_per_sec': cfg.batch_size * cfg.seq_len / seconds,
            'model_flops_per_sec': flops / seconds}


def main(argv: list[str]) -> None:
    spec, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=10, help='steps per timed repeat')
    parser.add_argument('--repeats', type=int, default=5)
    args = parser.parse_args(rest)
    cfg = load_config(spec or 'configs/pretrain.py:tiny')
    apply_overrides(cfg, overrides)
    result = time_steps(cfg, args.steps, args.repeats)
    devices = jax.device_count()
    peak = peak_flops_per_device(cfg.peak_flops_per_device) * devices
    matmul = measured_matmul_flops() if jax.devices()[0].platform == 'cpu' else math.nan
    m = cfg.model
    print(f'config: L{m.num_layers}/H{m.hidden_size}/A{m.num_heads}, vocab {m.vocab_size}, '
          f'batch {cfg.batch_size} x seq {cfg.seq_len}, {m.dtype}, '
          f'{result["params"] / 1e6:.2f}M params, {devices} x {jax.devices()[0].device_kind}')
    print(f'step: {1e3 * result["step_seconds"]:.1f} ms (median of {args.repeats} x '
          f'{args.steps} steps)')
    print(f'tokens/s: {result["tokens_per_sec"]:,.0f}')
    print(f'model TFLOP/s: {result["model_flops_per_sec"] / 1e12:.3f} '
          f'(peak {peak / 1e12:.3f}; CPU fp32 matmul measured now: {matmul / 1e12:.3f})')
    print(f'MFU: {100 * result["model_flops_per_sec"] / peak:.1f}%')


if __name__ == '__main__':
    main(sys.argv[1:])
