"""LAMB as an optimizer choice (engine/optim.py): one step equals optax.lamb used directly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.pretrain import get_config
from engine.errors import ConfigError
from engine.optim import OptimizerConfig, learning_rate_schedule, make_optimizer, weight_decay_mask


def _tree():
    keys = jax.random.split(jax.random.key(0), 6)
    params = {'dense': {'kernel': jax.random.normal(keys[0], (8, 4)),
                        'bias': jax.random.normal(keys[1], (4,))},
              'LayerNorm': {'scale': 1 + 0.1 * jax.random.normal(keys[2], (4,)),
                            'bias': jax.random.normal(keys[3], (4,))}}
    grads = {'dense': {'kernel': jax.random.normal(keys[4], (8, 4)),
                       'bias': jnp.full((4,), 0.5)},
             'LayerNorm': {'scale': jax.random.normal(keys[5], (4,)),
                           'bias': jnp.full((4,), -2.0)}}
    return params, grads


@pytest.mark.parametrize('clip', [0.0, 0.1])
def test_lamb_step_matches_optax_lamb(clip):
    cfg = get_config('tiny').optimizer
    cfg.name, cfg.weight_decay, cfg.max_grad_norm, cfg.warmup_steps = 'lamb', 0.3, clip, 0
    params, grads = _tree()
    cfg = OptimizerConfig.from_config(cfg)
    tx = make_optimizer(cfg, total_steps=10)
    reference = optax.lamb(learning_rate_schedule(cfg, 10), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    if clip:
        reference = optax.chain(optax.clip_by_global_norm(clip), reference)
    state, ref_state = tx.init(params), reference.init(params)
    for _ in range(2):  # the second step exercises the moments and the schedule
        updates, state = tx.update(grads, state, params)
        expected, ref_state = reference.update(grads, ref_state, params)
        for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(got, want)
        params = optax.apply_updates(params, updates)
    # LAMB is not AdamW: the trust ratio rescales each leaf's step.
    adam_cfg = get_config('tiny').optimizer
    adam_cfg.weight_decay, adam_cfg.max_grad_norm, adam_cfg.warmup_steps = 0.3, clip, 0
    adam_cfg = OptimizerConfig.from_config(adam_cfg)
    adam_updates, _ = make_optimizer(adam_cfg, 10).update(grads, make_optimizer(
        adam_cfg, 10).init(params), params)
    assert not np.allclose(adam_updates['dense']['kernel'], updates['dense']['kernel'])


def test_lamb_weight_decay_skips_bias_and_layernorm():
    cfg = get_config('tiny').optimizer
    cfg.name, cfg.max_grad_norm, cfg.warmup_steps = 'lamb', 0.0, 0
    params, grads = _tree()
    zero = jax.tree.map(jnp.zeros_like, grads)  # zero gradients: only decay moves params
    cfg.weight_decay = 0.5
    cfg = OptimizerConfig.from_config(cfg)
    updates, _ = make_optimizer(cfg, 10).update(zero, make_optimizer(cfg, 10).init(params),
                                                params)
    assert np.abs(updates['dense']['kernel']).min() > 0
    for leaf in (updates['dense']['bias'], updates['LayerNorm']['scale'],
                 updates['LayerNorm']['bias']):
        np.testing.assert_array_equal(leaf, 0.0)


def test_unknown_optimizer_is_a_config_error():
    cfg = get_config('tiny').optimizer
    cfg.name = 'sgd'
    with pytest.raises(ConfigError, match="optimizer.name: 'sgd'"):
        make_optimizer(OptimizerConfig.from_config(cfg), 10)
