"""End to end through `launch.py pretrain`: sequence-length phases with a batch-size ramp,
and the budget learning-rate schedule, each resumed exactly across a boundary."""

import shutil

import numpy as np
import pytest

from pretrain.phases import StepPlan
from tests.helpers import launch, read_metrics, tiny_args
from tests.test_pretrain_e2e import assert_same_params, final_params

PHASES = ['--config.seq_len_phases=32:0.5,64:0.5', '--config.batch_size_ramp=8:0.25',
          '--config.log_every_steps=1', '--config.checkpoint_every_steps=100']


def losses(workdir) -> dict[int, float]:
    return {r['step']: r['loss'] for r in read_metrics(workdir) if 'loss' in r}


def plan_of_phases_run() -> StepPlan:
    return StepPlan(num_steps=12, batch_size=16, seq_len=32, seq_len_phases='32:0.5,64:0.5',
                    batch_size_ramp='8:0.25')


@pytest.mark.slow
def test_phases_and_ramp_resume_exactly_inside_the_second_phase(tmp_path, corpus):
    """12 steps: 3 ramp steps of 8 sequences, then 16; steps 7-12 at 64 tokens. A run
    stopped after step 9 (by a token budget) and resumed matches an uninterrupted one."""
    args = tiny_args(corpus, 12, *PHASES, dropout=0.1)
    reference = launch(tmp_path / 'reference', args)
    assert reference.returncode == 0, reference.stderr
    assert 'steps: 32 tokens for steps 1-6; 64 tokens for steps 7-12; batch 8 -> 16' in (
        reference.stdout)
    plan = plan_of_phases_run()
    assert [plan.batch_size_at(s) for s in (0, 2, 3)] == [8, 8, 16]
    stop = plan.tokens_at(9)  # 3 x 8 x 32 + 3 x 16 x 32 + 3 x 16 x 64
    assert stop == 768 + 1536 + 3072

    part = tmp_path / 'interrupted'
    first = launch(part, [*args, f'--config.train_tokens={stop}'])
    assert first.returncode == 0, first.stderr
    assert max(losses(part)) == 9
    resumed = launch(part, args)
    assert resumed.returncode == 0, resumed.stderr
    assert 'resuming from step 9' in resumed.stdout
    want, got = losses(tmp_path / 'reference'), losses(part)
    assert sorted(want) == list(range(1, 13))
    assert [got[s] for s in range(1, 13)] == [want[s] for s in range(1, 13)]
    assert_same_params(final_params(tmp_path / 'reference'), final_params(part))
    # Throughput counts each interval's own tokens: a step of phase 2 has 16 x 64.
    last = [r for r in read_metrics(part) if r.get('step') == 12 and 'tokens_per_sec' in r]
    assert last and last[0]['tokens_per_sec'] == pytest.approx(
        1024 * last[0]['steps_per_sec'], rel=1e-6)


@pytest.mark.slow
def test_budget_schedule_decays_by_tokens_and_resumes_exactly(tmp_path, corpus):
    """schedule=budget with a token budget of 8 steps in a 12-step run: the rate decays over
    the last half of the tokens, reaching the end of the decay at step 8. The same run
    restarted from its step-4 checkpoint (as after a crash) repeats steps 5-8 exactly: the
    injected rate is checkpointed with the state, the budget's tokens with the meta."""
    tokens = 8 * 16 * 32
    args = tiny_args(corpus, 12, '--config.optimizer.schedule=budget',
                     '--config.optimizer.decay_fraction=0.5', f'--config.train_tokens={tokens}',
                     '--config.log_every_steps=1', '--config.checkpoint_every_steps=4')
    reference = tmp_path / 'reference'
    result = launch(reference, args)
    assert result.returncode == 0, result.stderr
    rates = {r['step']: r['learning_rate'] for r in read_metrics(reference) if 'loss' in r}
    assert sorted(rates) == list(range(1, 9))  # the token budget ended the run
    # The rate of step s + 1 uses s steps done: warm-up s / 2, progress max(s / 8 by
    # tokens, s / 12 by steps) = s / 8, decaying linearly from 0.5 to 1.
    peak = 3e-3
    expected = [0.0, 0.5, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    np.testing.assert_allclose([rates[s] for s in range(1, 9)], [peak * e for e in expected],
                               rtol=1e-5, atol=1e-9)

    part = tmp_path / 'crashed'
    shutil.copytree(reference, part)
    shutil.rmtree(part / 'checkpoints' / '8')
    resumed = launch(part, args)
    assert resumed.returncode == 0, resumed.stderr
    assert 'resuming from step 4' in resumed.stdout
    want, got = losses(reference), losses(part)
    assert [got[s] for s in range(1, 9)] == [want[s] for s in range(1, 9)]
    assert_same_params(final_params(reference), final_params(part))
