"""A sharded masked-LM state and jitted train step on a mesh, for the sharding tests."""

import functools

import flax.linen as nn
import jax
import numpy as np

from configs.pretrain import get_config
from engine import mesh as mesh_lib
from engine.optim import OptimizerConfig, adamw, learning_rate_schedule
from models.bert import BertConfig, BertForMaskedLM
from pretrain import steps
from pretrain.masking import MaskingConfig


def sharded_mlm(model_cfg: BertConfig, mesh_shape, devices=None, grad_accum: int = 1):
    """(config, mesh, state, shardings, train step) of the tiny recipe with `model_cfg`,
    sequences of model_cfg.max_position_embeddings tokens."""
    cfg = get_config('tiny')
    mesh = mesh_lib.make_mesh(mesh_shape, cfg.mesh.axes, devices=devices)
    model = BertForMaskedLM(model_cfg)
    tx_cfg = OptimizerConfig.from_config(cfg.optimizer)
    tx = adamw(tx_cfg, 10)
    init = functools.partial(steps.init_state, jax.random.key(0), model, tx,
                             model_cfg.max_position_embeddings)
    with mesh_lib.sharding_context(mesh, cfg.mesh.rules):
        _, shardings = mesh_lib.abstract_and_shardings(init, mesh, cfg.mesh.rules)
        state = jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
        train = jax.jit(steps.mlm_train_step(
            model=model, tx=tx, schedule=learning_rate_schedule(tx_cfg, 10),
            masking=MaskingConfig(vocab_size=model_cfg.vocab_size, max_predictions=3),
            word_starts=None, seed=0, grad_accum_steps=grad_accum),
            in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
            out_shardings=(shardings, None))
    return cfg, mesh, state, shardings, train


def packed_batch(rows: int, seq: int, vocab: int) -> dict:
    """A fixed batch of [CLS] ... [SEP] rows, one of them padded after 10 tokens."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, size=(rows, seq)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 3
    ids[1, 10:] = 0
    return {'input_ids': ids, 'segment_ids': (ids != 0).astype(np.int32)}
