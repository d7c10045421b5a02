"""Train-step throughput: tokens/s and MFU for a config, on synthetic full-length batches.

    python -m pretrain.benchmark --config configs/pretrain.py:tiny
    python -m pretrain.benchmark --config configs/pretrain.py:mini --config.batch_size=32
    python -m pretrain.benchmark --config configs/pretrain.py:tiny --compare-torch
    python -m pretrain.benchmark --config configs/pretrain.py:base --seq-len 512 --dtype bfloat16
    python -m pretrain.benchmark --suite gpu   # the prepared GPU grid (pretrain/benchmark_suite.py)

Times the jitted step (forward, backward, AdamW update) after warm-up, repeats the
measurement and reports the median. MFU is model FLOPs (models/flops.py) per second over
the peak: the chip's dense bf16 spec on TPU/GPU (engine/hardware.py), or on CPU a large
fp32 matmul timed in this same run, between the repeats.

--compare-torch also trains Hugging Face transformers' PyTorch BertForMaskedLM with the same
dimensions (pretrain/torch_baseline.py) in the same process, alternating JAX and torch
repeats so that other load on the machine hits both alike, and ends with `ratio vs torch`.
"""

import argparse
import os
import statistics
import sys

import jax

from engine.config_cli import apply_overrides, load_config, split_config_args
from engine.errors import ConfigError
from engine.hardware import measured_matmul_flops, total_peak_flops
from models.flops import train_flops_per_step
from pretrain import benchmark_suite
from pretrain.sections import masking_config
from pretrain.step_runner import JaxRunner, synthetic_batch


def time_steps(cfg, num_steps: int, repeats: int) -> dict:
    runner = JaxRunner(cfg)
    runner.run(3)  # warm-up
    seconds = statistics.median(runner.run(num_steps) for _ in range(repeats))
    return {'params': runner.params, 'step_seconds': seconds,
            'tokens_per_sec': cfg.batch_size * cfg.seq_len / seconds,
            'model_flops_per_sec': runner.flops / seconds}


def cpu_threads() -> int:
    """Threads XLA's CPU client runs on: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def _parse(argv: list[str]):
    spec, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=10, help='steps per timed repeat')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--seq-len', type=int, help='shorthand for --config.seq_len')
    parser.add_argument('--batch-size', type=int, help='shorthand for --config.batch_size')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'),
                        help='compute dtype (params stay float32); --config.model.dtype')
    parser.add_argument('--compare-torch', action='store_true',
                        help="also time transformers' PyTorch BertForMaskedLM, same dims")
    parser.add_argument('--torch-steps', type=int, help='torch steps per repeat (default --steps)')
    parser.add_argument('--torch-threads', type=int, default=cpu_threads(),
                        help='torch intra-op threads (default: the CPU threads XLA uses)')
    args = parser.parse_args(rest)
    cfg = load_config(spec or 'configs/pretrain.py:tiny')
    apply_overrides(cfg, overrides)
    for key, value in (('seq_len', args.seq_len), ('batch_size', args.batch_size)):
        if value is not None:
            cfg[key] = value
    if args.dtype:
        cfg.model.dtype = args.dtype
    return cfg, args


def _measure(cfg, args) -> dict:
    """Warm-up, then `repeats` rounds of JAX / torch / matmul peak, alternating the order."""
    jax_runner = JaxRunner(cfg)
    torch_runner = None
    if args.compare_torch:
        from pretrain.torch_baseline import TorchRunner
        torch_runner = TorchRunner(cfg, synthetic_batch(cfg.batch_size, cfg.seq_len,
                                                        cfg.model.vocab_size)['input_ids'],
                                   masking_config(cfg, cfg.model.vocab_size).max_predictions,
                                   args.torch_threads)
        torch_runner.run(3)
    jax_runner.run(3)
    on_cpu = jax.devices()[0].platform == 'cpu'
    times = {'jax': [], 'torch': [], 'matmul': []}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        order = ['jax', 'torch'] if r % 2 == 0 else ['torch', 'jax']
        for name in order:
            if name == 'jax':
                times['jax'].append(jax_runner.run(args.steps))
            elif torch_runner is not None:
                times['torch'].append(torch_runner.run(args.torch_steps or args.steps))
        if on_cpu:
            times['matmul'].append(measured_matmul_flops())
    load.append(os.getloadavg()[0])
    return {'jax': jax_runner, 'torch': torch_runner, 'times': times, 'load': load}


def _report(cfg, args, result: dict) -> None:
    jax_runner, times = result['jax'], result['times']
    tokens = cfg.batch_size * cfg.seq_len
    seconds = statistics.median(times['jax'])
    devices = jax.device_count()
    if times['matmul']:
        peak = statistics.median(times['matmul'])
        peak_text = f'measured fp32 matmul peak {peak / 1e12:.3f}'
    else:
        peak = total_peak_flops(cfg.peak_flops_per_device)
        peak_text = (f'peak {peak / 1e12:.1f} (dense bf16 spec x {devices})' if peak else
                     'unknown peak: set --config.peak_flops_per_device for MFU')
    m = cfg.model
    print(f'config: L{m.num_layers}/H{m.hidden_size}/A{m.num_heads}, vocab {m.vocab_size}, '
          f'batch {cfg.batch_size} x seq {cfg.seq_len}, {m.dtype}, remat {m.remat}, '
          f'{jax_runner.params / 1e6:.2f}M params, {devices} x {jax.devices()[0].device_kind}')
    print(f'step: {1e3 * seconds:.1f} ms (median of {args.repeats} x {args.steps} steps; '
          f'spread {1e3 * min(times["jax"]):.1f}-{1e3 * max(times["jax"]):.1f} ms)')
    print(f'tokens/s: {tokens / seconds:,.0f}')
    print(f'model TFLOP/s: {jax_runner.flops / seconds / 1e12:.3f} ({peak_text})')
    if peak:
        print(f'MFU: {100 * jax_runner.flops / seconds / peak:.1f}%')
    memory = jax_runner.memory()
    if memory:
        print('memory: ' + ', '.join(f'{k} {v / 2**20:,.1f} MiB' for k, v in memory.items()))
    print(f'load average (1 min) before/after: {result["load"][0]:.1f} / {result["load"][1]:.1f}'
          f' on {os.cpu_count()} cores')
    torch_runner = result['torch']
    if torch_runner is not None:
        torch_seconds = statistics.median(times['torch'])
        print(f'torch: BertForMaskedLM ({torch_runner.attention} attention), '
              f'{torch_runner.versions}, {torch_runner.threads} threads (JAX/XLA uses '
              f'{cpu_threads()}), labels -100 off masked positions, AdamW')
        print(f'torch step: {1e3 * torch_seconds:.1f} ms (median of {args.repeats} x '
              f'{args.torch_steps or args.steps} steps, alternating with JAX)')
        print(f'torch tokens/s: {tokens / torch_seconds:,.0f}')
        # torch computes vocabulary logits at every position, JAX only at the masked ones:
        # at equal matmul efficiency the speed ratio would be the ratio of their FLOPs.
        torch_flops = train_flops_per_step(jax_runner.model_config, cfg.batch_size,
                                           cfg.seq_len, cfg.seq_len)
        print(f'torch model TFLOP/s: {torch_flops / torch_seconds / 1e12:.3f} (vocab logits '
              f'at all {cfg.seq_len} positions)')
        print(f'FLOP ratio torch/JAX (the speed ratio at equal efficiency): '
              f'{torch_flops / jax_runner.flops:.2f}')
        print(f'ratio vs torch: {torch_seconds / seconds:.2f}')


def main(argv: list[str]) -> None:
    if any(a == '--suite' or a.startswith('--suite=') for a in argv):
        sys.exit(benchmark_suite.main(argv))
    try:
        cfg, args = _parse(argv)
        result = _measure(cfg, args)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    _report(cfg, args, result)


if __name__ == '__main__':
    main(sys.argv[1:])
