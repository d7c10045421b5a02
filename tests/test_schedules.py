"""Learning-rate schedules (wsd, budget), the host-fed learning rate, and the step plan of
sequence-length phases and batch-size ramps: values against hand-computed ones."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.pretrain import get_config
from engine.budget import Budget
from engine.errors import ConfigError
from engine.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from engine.step import TrainState, set_learning_rate, train_step
from pretrain import phases, sections
from pretrain.sections import check_batch, validate_values


def rates(cfg: OptimizerConfig, total: int, steps) -> list[float]:
    schedule = learning_rate_schedule(cfg, total)
    return [float(schedule(s)) for s in steps]


@pytest.mark.parametrize('shape, expected', [
    # Steps 90..100 decay; at step 95 the decay is half done (t = 0.5).
    ('linear', [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0]),
    ('cosine', [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0]),  # 0.5 (1 + cos(pi / 2)) = 0.5
    ('sqrt', [0.0, 0.5, 1.0, 1.0, 1.0, 1 - math.sqrt(0.5), 0.0]),
])
def test_wsd_warms_up_holds_then_decays_over_the_last_fraction(shape, expected):
    cfg = OptimizerConfig(schedule='wsd', learning_rate=2.0, warmup_steps=10,
                          decay_fraction=0.1, decay_shape=shape)
    got = rates(cfg, 100, [0, 5, 10, 50, 90, 95, 100])
    np.testing.assert_allclose(got, [2 * e for e in expected], rtol=1e-5, atol=1e-6)
    # Quarter of the way through the decay, each shape at its own value.
    quarter = {'linear': 0.75, 'cosine': 0.5 * (1 + math.cos(math.pi / 4)), 'sqrt': 0.5}
    np.testing.assert_allclose(rates(cfg, 100, [92.5]), [2 * quarter[shape]], rtol=1e-5)


def test_wsd_decay_fraction_one_is_a_plain_decay_from_the_start():
    cfg = OptimizerConfig(schedule='wsd', learning_rate=1.0, decay_fraction=1.0)
    np.testing.assert_allclose(rates(cfg, 10, [0, 2, 5, 10]), [1.0, 0.8, 0.5, 0.0], atol=1e-6)


def test_default_linear_schedule_is_optax_adamw_unchanged():
    """The default path builds exactly optax.adamw(schedule, ...): same updates bit for bit."""
    cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=2, weight_decay=0.0,
                          max_grad_norm=0.0)
    params = {'w': jnp.arange(6.0).reshape(2, 3)}
    grads = {'w': jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    ours = make_optimizer(cfg, 10)
    theirs = optax.adamw(learning_rate_schedule(cfg, 10), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                         weight_decay=0.0)
    a, b = ours.init(params), theirs.init(params)
    for _ in range(3):
        ua, a = ours.update(grads, a, params)
        ub, b = theirs.update(grads, b, params)
        np.testing.assert_array_equal(ua['w'], ub['w'])


def budget(max_runtime=0.0, train_tokens=0, **kwargs) -> Budget:
    cfg = types.SimpleNamespace(max_runtime=max_runtime, train_tokens=train_tokens)
    return Budget.resume(cfg, kwargs.pop('meta', None), kwargs.pop('start_step', 0),
                         kwargs.pop('tokens_per_step', 100), kwargs.pop('started', 1000.0),
                         **kwargs)


def test_progress_is_the_budget_that_ends_first():
    tokens = budget(train_tokens=1000)  # 10 steps' worth, of a 100-step run
    assert tokens.progress(3, 100) == pytest.approx(0.3)
    assert tokens.progress(20, 100) == 1.0  # capped
    timed = budget(max_runtime=50.0, meta={'budget': {'elapsed_seconds': 10.0}}, start_step=4)
    # 10 s before this attempt + 15 s of it = 25 of 50 s; steps say only 5 of 100.
    assert timed.progress(5, 100, now=1015.0) == pytest.approx(0.5)
    assert timed.progress(90, 100, now=1015.0) == pytest.approx(0.9)  # steps end first


def pretrain_cfg(**changes):
    cfg = get_config('tiny')
    cfg.num_train_steps, cfg.optimizer.warmup_steps = 100, 10
    cfg.optimizer.schedule, cfg.optimizer.learning_rate = 'budget', 1.0
    for key, value in changes.items():
        section, _, name = key.rpartition('.')
        (cfg[section] if section else cfg)[name] = value
    return cfg


def _rate_args(cfg) -> tuple:
    return sections.optimizer_config(cfg), cfg.num_train_steps


def test_budget_schedule_by_tokens_is_a_function_of_the_step():
    cfg = pretrain_cfg(train_tokens=2000, **{'optimizer.decay_fraction': 0.5})
    b = budget(train_tokens=2000)  # 100 tokens per step: the budget ends at step 20
    rate = phases.budget_rates(*_rate_args(cfg), b, clock=lambda: 1000.0)
    # warm-up over 10 steps; progress = step / 20, decay (linear) over progress 0.5..1.
    expected = {0: 0.0, 5: 0.5, 10: 1.0, 15: 0.5, 18: 0.2, 20: 0.0}
    for step, value in expected.items():
        assert float(rate(step)) == pytest.approx(value, abs=1e-6), step
    # Resumed at step 12 from its checkpoint's meta: the same rates from there on.
    resumed = budget(train_tokens=2000, meta={'budget': {'tokens_seen': 1200}}, start_step=12)
    again = phases.budget_rates(*_rate_args(cfg), resumed, clock=lambda: 0.0)
    assert [float(again(s)) for s in (15, 18)] == [float(rate(s)) for s in (15, 18)]


def test_budget_schedule_by_time_follows_the_clock():
    cfg = pretrain_cfg(max_runtime=100.0, **{'optimizer.warmup_steps': 0,
                                             'optimizer.decay_shape': 'cosine'})
    now = [1000.0]
    b = budget(max_runtime=100.0, meta={'budget': {'elapsed_seconds': 40.0}}, start_step=3)
    rate = phases.budget_rates(*_rate_args(cfg), b, clock=lambda: now[0])
    assert float(rate(3)) == pytest.approx(1.0)  # 40 % spent: stable
    now[0] = 1055.0  # 95 s of 100: halfway through the last 10 %: cosine gives 0.5
    assert float(rate(4)) == pytest.approx(0.5, abs=1e-6)
    now[0] = 1070.0
    assert float(rate(5)) == 0.0
    # Several processes: the agreed elapsed time is refreshed every `every` steps only.
    seen = []
    agreed = phases.budget_rates(*_rate_args(cfg), b, agree=lambda v: seen.append(v) or v,
                                 clock=lambda: now[0], every=5)
    now[0] = 1000.0
    agreed(3)
    now[0] = 1055.0
    assert float(agreed(4)) == pytest.approx(1.0)  # step 4: still the time agreed at step 3
    assert float(agreed(5)) == pytest.approx(0.5, abs=1e-6) and seen == [40.0, 95.0]


def test_train_step_uses_and_logs_the_host_learning_rate():
    cfg = OptimizerConfig(schedule='budget', learning_rate=1.0, max_grad_norm=0.0,
                          weight_decay=0.0)
    tx = make_optimizer(cfg, 10)
    params = {'w': jnp.ones(3)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))

    def loss_fn(p, batch, rng):
        value = jnp.sum(p['w'] * batch['x'])
        return value, {'loss_sum': value, 'weight_sum': jnp.float32(1.0)}
    batch = {'x': jnp.array([[1.0, -2.0, 3.0]])}
    step = jax.jit(lambda s, b, lr: train_step(s, b, lr, loss_fn=loss_fn, tx=tx,
                                               schedule=lambda _: 0.0, seed=0))
    new, metrics = step(state, batch, np.float32(0.25))
    assert float(metrics['learning_rate']) == 0.25
    # Adam's first step moves every weight by lr * sign(gradient).
    np.testing.assert_allclose(new.params['w'], [0.75, 1.25, 0.75], rtol=1e-5)
    with pytest.raises(ValueError, match="schedule='budget'"):
        set_learning_rate(optax.adam(1.0).init(params), 0.1)


def test_step_plan_of_phases_and_a_ramp():
    cfg = pretrain_cfg(num_train_steps=20, batch_size=64, seq_len=32,
                       seq_len_phases='32:0.75,64:0.25', batch_size_ramp='8:0.35')
    plan = sections.step_plan(cfg)
    assert [(p.seq_len, p.start, p.end) for p in plan.phases] == [(32, 0, 15), (64, 15, 20)]
    # 7 ramp steps, stage = step * 7 // 7 = step: sizes 8 + (56 * stage // 7) // 8 * 8.
    sizes = [plan.batch_size_at(s) for s in range(9)]
    assert sizes == [8, 16, 24, 32, 40, 48, 56, 64, 64]
    assert plan.sizes() == [8, 16, 24, 32, 40, 48, 56, 64] and plan.active
    assert plan.rows_before(3) == 8 + 16 + 24
    assert plan.rows_before(22) == plan.rows_before(20) + 2 * 64  # past the plan
    rows = sum(sizes[:7]) + 64 * 8  # steps 0..14 at 32 tokens
    assert plan.tokens_at(15) == rows * 32 and plan.tokens_at(17) == rows * 32 + 2 * 64 * 64
    assert [plan.seq_len(s) for s in (14, 15, 19, 25)] == [32, 64, 64, 64]
    assert sections.final_config(cfg).seq_len == 64
    plain = sections.step_plan(get_config('tiny'))
    assert not plain.active and plain.rows_before(5) == 5 * 32


def test_ramp_sizes_are_few_and_multiples_of_the_start():
    cfg = pretrain_cfg(num_train_steps=100_000, batch_size=4096, batch_size_ramp='256:0.05')
    plan = sections.step_plan(cfg)
    assert len(plan.sizes()) <= 8 and all(s % 256 == 0 for s in plan.sizes())
    assert plan.batch_size_at(0) == 256 and plan.batch_size_at(5000) == 4096
    assert all(plan.batch_size_at(s) <= plan.batch_size_at(s + 1) for s in range(0, 5100, 7))


def test_planned_batches_are_contiguous_rows_of_each_phase():
    cfg = pretrain_cfg(num_train_steps=8, batch_size=4, seq_len=4,
                       seq_len_phases='4:0.5,8:0.5', batch_size_ramp='2:0.5')
    plan = sections.step_plan(cfg)
    short = {'input_ids': np.arange(40 * 4).reshape(40, 4), 'segment_ids': np.ones((40, 4))}
    long = {'input_ids': np.arange(40 * 8).reshape(40, 8), 'segment_ids': np.ones((40, 8))}
    made = phases.PlannedBatches(plan, [short, long], seed=0, shard=(0, 1))
    got = [made.batch(i, 0)['input_ids'] for i in range(8)]
    # Ramp sizes are multiples of START above it: 2 + (2 * stage // 7) // 2 * 2 stays 2.
    assert [g.shape for g in got] == [(2, 4)] * 4 + [(4, 8)] * 4
    first_rows = np.concatenate([g[:, 0] // 4 for g in got[:4]])
    assert len(set(first_rows.tolist())) == 8  # no row twice within the epoch
    # The long phase reads its own rows from row rows_before(4) = 8 of its stream on.
    long_rows = np.concatenate([g[:, 0] // 8 for g in got[4:]])
    assert len(set(long_rows.tolist())) == 16
    again = phases.PlannedBatches(plan, [short, long], seed=0, shard=(0, 1))
    np.testing.assert_array_equal(again.batch(5, 0)['input_ids'], got[5])  # pure
    # Two processes split each global batch.
    halves = [phases.PlannedBatches(plan, [short, long], 0, (i, 2)).batch(2, 0) for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h['input_ids'] for h in halves]), got[2])


@pytest.mark.parametrize('changes, message', [
    ({'max_runtime': 0.0, 'train_tokens': 0}, "schedule: 'budget' needs max_runtime"),
    ({'seq_len_phases': '128:0.5,512:0.6'}, 'seq_len_phases: expected'),
    ({'seq_len_phases': '128'}, 'seq_len_phases: expected'),
    ({'seq_len_phases': '128:0.999,512:0.001'}, 'gets no step'),
    ({'seq_len_phases': '128:0.5,1024:0.5'}, 'exceeds model.max_position_embeddings'),
    ({'batch_size_ramp': '64:0.1'}, 'batch_size_ramp: expected'),
    ({'batch_size_ramp': '8:0'}, 'batch_size_ramp: expected'),
    ({'optimizer.decay_shape': 'exp'}, 'optimizer.decay_shape'),
    ({'optimizer.decay_fraction': 1.5}, 'optimizer.decay_fraction'),
])
def test_one_line_config_errors(changes, message):
    cfg = pretrain_cfg(**{'train_tokens': 1000, **changes})
    with pytest.raises(ConfigError, match=message) as error:
        validate_values(cfg)
    assert '\n' not in str(error.value)


def test_rope_lifts_the_phase_length_cap_and_ramp_start_must_split():
    cfg = pretrain_cfg(train_tokens=1000, seq_len_phases='128:0.5,1024:0.5')
    cfg.model.position_embedding = 'rope'
    validate_values(cfg)
    cfg = pretrain_cfg(train_tokens=1000, batch_size_ramp='6:0.1')
    check_batch(cfg, 2)  # 6 splits over 2 devices
    with pytest.raises(ConfigError, match='batch_size_ramp: START 6 is not divisible'):
        check_batch(cfg, 4)


def test_budget_last_step_with_steps_of_different_sizes():
    sizes = [1, 2, 3, 4, 5]  # tokens of steps 1..5
    tokens_at = lambda s: sum(sizes[:s])  # noqa: E731
    b = budget(train_tokens=6, tokens_at=tokens_at)
    assert b.last_step(5) == 3 and b.tokens(3) == 6  # 1 + 2 + 3 reaches the budget
    resumed = budget(train_tokens=10, tokens_at=tokens_at, start_step=2,
                     meta={'budget': {'tokens_seen': 3}})
    assert resumed.last_step(5) == 4 and resumed.meta(4)['tokens_seen'] == 10


def test_a_planned_run_resumes_only_with_its_plan():
    cfg = pretrain_cfg(seq_len_phases='128:0.5,512:0.5')
    sections.check_plan_resume(cfg, cfg.to_dict())
    # no plan: the steps may change
    sections.check_plan_resume(get_config('tiny'), {'num_train_steps': 5})
    for key, value in [('seq_len_phases', '128:0.9,512:0.1'), ('num_train_steps', 50),
                       ('batch_size_ramp', '8:0.1')]:
        saved = {**cfg.to_dict(), key: value}
        with pytest.raises(ConfigError, match=f'^{key}: the checkpoint was made with'):
            sections.check_plan_resume(cfg, saved)


def test_fine_tuning_refuses_the_budget_schedule():
    params = {'w': jnp.ones((2, 2))}
    with pytest.raises(ConfigError, match="schedule: 'budget' is for pretraining"):
        make_optimizer(OptimizerConfig(schedule='budget'), 10, params, {'w': 'train'})


def test_prepare_prepares_every_phase_length(tmp_path, corpus):
    from pretrain.train import prepare_only
    from text.records import read_index
    cfg = get_config('tiny')
    cfg.model.vocab_size, cfg.data.tokenizer_type, cfg.data.train_files = 128, 'bpe', corpus
    cfg.data.small_corpus_mb = 0.0  # a tiny corpus: no general encoder
    cfg.seq_len_phases = '16:0.5,32:0.5'
    directories = prepare_only(cfg, str(tmp_path / 'run'))
    assert sorted(read_index(d).seq_len for d in directories) == [16, 32]
