"""Compile time of the train step, unrolled vs scanned layers (`model.scan_layers`).

    python -m pretrain.benchmark_compile [--layers 4,12,24] [--repeats 3]

For each depth, compiles the jitted masked-LM train step of a small model (hidden 64) on
one device, alternating unrolled and scanned, and prints the median seconds of each and
their ratio scanned / unrolled (below 1: scanning compiles faster).
"""

import argparse
import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs.pretrain import get_config
from engine.optim import OptimizerConfig, adamw
from models.bert import BertConfig, BertForMaskedLM
from models.config import model_config
from pretrain import steps
from pretrain.masking import MaskingConfig

SEQ, BATCH, VOCAB = 16, 8, 96


def compile_seconds(model_cfg: BertConfig) -> float:
    """Seconds to lower and compile one train step of `model_cfg` (nothing cached)."""
    cfg = get_config('tiny')
    model = BertForMaskedLM(model_cfg)
    tx = adamw(OptimizerConfig.from_config(cfg.optimizer), 10)
    state = jax.eval_shape(lambda: nn.unbox(steps.init_state(jax.random.key(0), model, tx, SEQ)))
    step = jax.jit(steps.mlm_train_step(
        model=model, tx=tx, schedule=lambda s: 1e-3,
        masking=MaskingConfig(vocab_size=VOCAB, max_predictions=3), word_starts=None, seed=0))
    batch = {'input_ids': jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32),
             'segment_ids': jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)}
    start = time.perf_counter()
    step.lower(state, batch).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layers', default='4,12,24')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    for layers in (int(n) for n in args.layers.split(',')):
        base = model_config(dict(vocab_size=VOCAB, hidden_size=64, num_layers=layers, num_heads=2,
                          intermediate_size=128, max_position_embeddings=SEQ,
                          dropout_rate=0.0, attention_dropout_rate=0.0))
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for scan in (False, True):  # alternated, so drift hits both alike
                jax.clear_caches()
                times[scan].append(compile_seconds(dataclasses.replace(base, scan_layers=scan)))
        unrolled, scanned = (statistics.median(times[s]) for s in (False, True))
        print(f'layers={layers}: unrolled {unrolled:.1f} s, scanned {scanned:.1f} s, '
              f'ratio {scanned / unrolled:.2f}', flush=True)


if __name__ == '__main__':
    main()
