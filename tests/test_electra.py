"""objective='electra': config checks, the generator's size, the loss, accumulation,
FLOPs, and sharded training on 8 fake CPU devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.pretrain import get_config
from engine import mesh as mesh_lib
from engine.errors import ConfigError
from engine.optim import OptimizerConfig, adamw, learning_rate_schedule
from models.bert import BertConfig
from models.electra import ElectraForPretraining, electra_train_flops, generator_config
from models.flops import forward_flops
from pretrain import dry_run, electra, objective, steps
from pretrain.masking import MaskingConfig
from pretrain.sections import validate_values
from tests.sharded import packed_batch

SEQ, BATCH, VOCAB = 16, 8, 96
MODEL = BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                   intermediate_size=64, max_position_embeddings=SEQ, dropout_rate=0.0,
                   attention_dropout_rate=0.0)
MASKING = MaskingConfig(vocab_size=VOCAB, max_predictions=4)


@pytest.mark.parametrize('key, value, message', [
    ('objective', 'bart', "objective: must be one of ('mlm', 'electra'), got 'bart'"),
    ('electra.generator_size', 0.0, 'electra.generator_size: generator_size must be in (0, 1]'),
    ('electra.generator_size', 1.5, 'electra.generator_size: generator_size must be in (0, 1]'),
    ('electra.disc_weight', -1.0, 'electra.disc_weight: must be >= 0'),
    ('masking.span_length', -1.0, 'masking.span_length: must be >= 0'),
    ('masking.eval_mask_rate', 1.0, 'masking.eval_mask_rate: must be in (0, 1)'),
])
def test_bad_values_are_one_line_config_errors(key, value, message):
    cfg = get_config('tiny')
    cfg.objective = 'electra'
    section, _, leaf = key.rpartition('.')
    (cfg[section] if section else cfg)[leaf] = value
    with pytest.raises(ConfigError) as err:
        validate_values(cfg)
    assert str(err.value).startswith(message) and '\n' not in str(err.value)


def test_span_masking_excludes_whole_word():
    cfg = get_config('tiny')
    cfg.masking.span_length, cfg.masking.whole_word = 3.0, True
    with pytest.raises(ConfigError, match='masking.span_length: span masking and'):
        validate_values(cfg)


def test_generator_is_a_fraction_of_the_discriminator():
    base = BertConfig(hidden_size=768, num_heads=12, intermediate_size=3072, num_layers=12)
    gen = generator_config(base, 0.25)  # ELECTRA-base's generator: 256 in the paper's 1/3
    assert (gen.hidden_size, gen.num_heads, gen.intermediate_size, gen.num_layers) == (
        192, 3, 768, 12)
    assert gen.head_dim == base.head_dim
    tiny = generator_config(MODEL, 0.25)
    assert (tiny.hidden_size, tiny.num_heads, tiny.intermediate_size) == (8, 1, 16)
    assert generator_config(MODEL, 1.0) == MODEL


@functools.cache
def _model_and_state():
    """(model, optimizer, initial state), made once for the tests that share them."""
    model = ElectraForPretraining(MODEL, generator_config(MODEL, 0.25))
    tx = adamw(OptimizerConfig.from_config(get_config('tiny').optimizer), 10)
    state = jax.jit(lambda: nn.unbox(steps.init_state(jax.random.key(0), model, tx, SEQ)))()
    return model, tx, state


def _inputs(seed=0):
    batch = jax.tree.map(jnp.asarray, packed_batch(BATCH, SEQ, VOCAB))
    inputs = steps.masked_inputs(jax.random.key(seed), batch, MASKING, None)
    # What the train step's `prepare` adds for the loss.
    real = (batch['input_ids'] != 0).sum()
    scale = float(inputs['masked_weights'].sum()) / real
    return {**inputs, 'original_ids': jnp.asarray(batch['input_ids']),
            'bce_scale': jnp.full((BATCH,), scale, jnp.float32)}


def test_loss_is_generator_mlm_plus_weighted_discriminator_bce():
    model, _, state = _model_and_state()
    params, inputs = state.params, _inputs()
    assert set(params) == {'bert', 'discriminator_predictions', 'generator'}
    terms_fn = functools.partial(electra.electra_terms, model=model, deterministic=True)

    @jax.jit
    def both(params, inputs):  # one compilation for the two weights
        objective_50, t = terms_fn(params, inputs, jax.random.key(1), disc_weight=50.0)
        return objective_50, terms_fn(params, inputs, jax.random.key(1), disc_weight=0.0)[0], t
    objective_50, objective_0, t = both(params, inputs)
    mlm_mean = float(t['gen_loss_sum'] / t['weight_sum'])
    bce_mean = float(t['disc_loss_sum'] / t['disc_weight_sum'])
    # Divided by the masked-token count (as the engine does): MLM mean + 50 x BCE mean.
    assert float(objective_50 / t['weight_sum']) == pytest.approx(mlm_mean + 50 * bce_mean,
                                                                  rel=1e-5)
    assert float(objective_0) == pytest.approx(float(t['gen_loss_sum']), rel=1e-6)
    assert 3.0 < mlm_mean < 6.0 and 0.3 < bce_mean < 1.0  # near chance at init
    # Only masked slots can be replaced; every real token is scored.
    assert 0 < float(t['disc_replaced_sum']) <= float(t['weight_sum'])
    assert float(t['disc_weight_sum']) == float((inputs['original_ids'] != 0).sum())


def test_no_gradient_flows_through_sampling():
    model, _, state = _model_and_state()
    inputs = _inputs()

    def disc_only(params):
        _, t = electra.electra_terms(params, inputs, jax.random.key(1), model=model,
                                     disc_weight=1.0, deterministic=True)
        return t['disc_loss_sum']
    grads = jax.jit(jax.grad(disc_only))(state.params)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads['generator']))
    assert float(jnp.abs(grads['discriminator_predictions']['dense']['kernel']).max()) > 0


def _train(accum: int, mesh_shape=(1,), devices=None):
    """(state, metrics) after two ELECTRA steps on `mesh_shape`, and the shardings."""
    cfg = get_config('tiny')
    tx_cfg = OptimizerConfig.from_config(cfg.optimizer)
    tx = adamw(tx_cfg, 10)
    model = ElectraForPretraining(MODEL, generator_config(MODEL, 0.25))
    mesh = mesh_lib.make_mesh(mesh_shape, cfg.mesh.axes, devices=devices)
    init = functools.partial(steps.init_state, jax.random.key(0), model, tx, SEQ)
    with mesh_lib.sharding_context(mesh, cfg.mesh.rules):
        _, shardings = mesh_lib.abstract_and_shardings(init, mesh, cfg.mesh.rules)
        state = jax.jit(lambda: nn.unbox(init()), out_shardings=shardings)()
        train = jax.jit(electra.electra_train_step(
            model=model, tx=tx, schedule=learning_rate_schedule(tx_cfg, 10),
            masking=MASKING, word_starts=None, seed=0, disc_weight=50.0,
            grad_accum_steps=accum), in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
            out_shardings=(shardings, None))
        for _ in range(2):
            state, metrics = train(state, mesh_lib.shard_batch(
                packed_batch(BATCH, SEQ, VOCAB), mesh))
    return jax.device_get(state), jax.device_get(metrics), shardings


@functools.cache
def _one_device():
    return _train(1, devices=jax.devices()[:1])[:2]


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_gradient_accumulation_gives_the_same_step():
    # Without dropout the masks, samples' keys aside, are the same; the BCE scale is global
    # (see pretrain/electra.py), so two micro-batches sum to the one-batch gradient.
    state1, metrics1 = _one_device()
    state2, metrics2, _ = _train(2, devices=jax.devices()[:1])
    assert float(metrics1['weight_sum']) == float(metrics2['weight_sum'])
    np.testing.assert_allclose(metrics1['gen_loss_sum'], metrics2['gen_loss_sum'], rtol=1e-5)
    _assert_close(state1.params['generator'], state2.params['generator'])


def test_every_parameter_has_logical_axes_and_the_head_shards():
    model = ElectraForPretraining(MODEL, generator_config(MODEL, 0.25))
    tx = adamw(OptimizerConfig.from_config(get_config('tiny').optimizer), 10)
    boxed = jax.eval_shape(functools.partial(steps.init_state, jax.random.key(0), model, tx,
                                             SEQ)).params
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    head = boxed['discriminator_predictions']
    assert head['dense']['kernel'].names == ('embed', None)
    assert head['dense_prediction']['kernel'].names == ('embed', None)


@pytest.mark.slow
def test_two_steps_on_a_2x2x2_mesh_match_one_device():
    assert jax.device_count() == 8
    state8, metrics8, shardings = _train(1, mesh_shape=(2, 2, 2))
    head = shardings.params['discriminator_predictions']
    assert head['dense']['kernel'].spec == P('fsdp', None)
    assert shardings.params['generator']['bert']['embeddings']['word_embeddings'][
        'embedding'].spec == P('tensor', 'fsdp')
    state1, metrics1 = _one_device()
    np.testing.assert_allclose(metrics1['loss_sum'], metrics8['loss_sum'], rtol=1e-5)
    assert float(metrics1['disc_correct_sum']) == float(metrics8['disc_correct_sum'])
    _assert_close(state1.params, state8.params)


def test_flops_count_both_models():
    gen = generator_config(MODEL, 0.25)
    flops = electra_train_flops(MODEL, gen, BATCH, SEQ, 4)
    head = BATCH * (2 * SEQ * 32 * 32 + 2 * SEQ * 32)
    expected = 3 * (forward_flops(gen, BATCH, SEQ, 4) + forward_flops(MODEL, BATCH, SEQ, 0)
                    + head)
    assert flops == expected
    cfg = get_config('tiny')
    cfg.objective, cfg.batch_size, cfg.seq_len = 'electra', BATCH, SEQ
    model = objective.build_model(objective.ObjectiveConfig.from_config(cfg, MODEL), MODEL)
    assert objective.flops_per_step(model, BATCH, SEQ, 4) == flops


def test_dry_run_reports_both_models():
    cfg = get_config('tiny')
    cfg.objective = 'electra'
    report = dry_run.describe(cfg, 'configs/pretrain.py:tiny')
    assert 'generator/bert/encoder/layer_0' in report
    assert 'discriminator_predictions/dense_prediction/kernel' in report
    [line] = [x for x in report.splitlines() if x.startswith('flops/step:')]
    model_cfg = BertConfig(**cfg.model.to_dict())
    expected = electra_train_flops(model_cfg, generator_config(model_cfg, 0.25), cfg.batch_size,
                                   cfg.seq_len, 20)  # ceil(0.15 x 128) slots
    assert line.split()[1] == f'{expected:.3e}'
