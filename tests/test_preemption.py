"""Preemption and budgets: SIGTERM saves and exits 75 (requeue), processes agree on the stop
step, max_runtime and train_tokens count across restarts."""

import json
import pathlib
import signal
import types

import numpy as np
import pytest

from engine import errors, loop
from engine.budget import Budget
from tests.helpers import launch, tiny_args
from tests.test_pretrain_e2e import has_logged, launch_and_signal


def budget_cfg(max_runtime=0.0, train_tokens=0):
    return types.SimpleNamespace(max_runtime=max_runtime, train_tokens=train_tokens)


def test_budget_counts_earlier_attempts():
    fresh = Budget.resume(budget_cfg(train_tokens=1000), None, 0, 100, started=50.0)
    assert fresh.last_step(500) == 10  # ceil(1000 / 100)
    assert fresh.meta(4)['tokens_seen'] == 400
    # Resumed at step 4 after 30 s and 400 tokens: 6 steps and 70 s are left.
    meta = {'budget': {'elapsed_seconds': 30.0, 'tokens_seen': 400}}
    resumed = Budget.resume(budget_cfg(100.0, 1000), meta, 4, 100, started=1000.0)
    assert resumed.last_step(500) == 10 and resumed.deadline() == 1070.0
    assert resumed.meta(6)['tokens_seen'] == 600
    # A longer sequence after the restart: the budget is in tokens, not steps.
    longer = Budget.resume(budget_cfg(train_tokens=1000), meta, 4, 200, started=0.0)
    assert longer.last_step(500) == 7
    spent = Budget.resume(budget_cfg(max_runtime=20.0), meta, 4, 100, started=0.0)
    assert spent.last_step(500) == 4  # nothing left to train
    assert Budget.resume(budget_cfg(), meta, 4, 100, 0.0).last_step(500) == 500
    # Checkpoints written before budgets existed: tokens from the step count.
    assert Budget.resume(budget_cfg(train_tokens=1000), {}, 4, 100, 0.0).tokens_before == 400


class FakeRun:
    """run_loop's callbacks on host numbers: records saves, can raise SIGTERM at a step."""

    def __init__(self, sigterm_at=0):
        self.saved, self.sigterm_at, self.flag = [], sigterm_at, None

    def callbacks(self):
        def step(state, batch):
            if state + 1 == self.sigterm_at:
                self.flag.raised = True
            return state + 1, {'loss_sum': 1.0, 'correct_sum': 0.0, 'weight_sum': 1.0,
                               'learning_rate': 0.1, 'grad_norm': 1.0}
        return loop.LoopCallbacks(step=step, evaluate=lambda s: {},
                                  save=lambda step, s: self.saved.append(step),
                                  write=lambda step, m: None)

    def run(self, num_steps=20, **kwargs):
        cfg = loop.LoopConfig(num_steps=num_steps, log_every=5, eval_every=0,
                              checkpoint_every=10, tokens_per_step=1, flops_per_step=1.0,
                              peak_flops=1.0, is_main=False, **kwargs)
        with loop.SigtermFlag() as self.flag:
            return loop.run_loop(0, ((i, None) for i in range(num_steps)), 0, cfg,
                                 self.callbacks(), self.flag)


def test_sigterm_saves_the_step_reached_and_asks_for_a_requeue():
    run = FakeRun(sigterm_at=7)
    with pytest.raises(errors.Preempted, match='saved a checkpoint at step 7'):
        run.run()
    assert run.saved == [7] and loop.REQUEUE_EXIT_CODE == 75


def test_max_runtime_saves_and_ends_normally():
    run = FakeRun()
    assert run.run(deadline=1.0) == 1  # a deadline long past: one step, saved, done
    assert run.saved == [1]


def test_processes_stop_at_the_same_step(monkeypatch):
    """With several processes the flags are exchanged at log/checkpoint steps only:
    SIGTERM on one process at step 7 stops every process at step 10 (log_every=5)."""
    seen = []

    def agree(*flags):  # what the all-gather returns when another process was signalled
        seen.append(flags)
        return (True, False) if len(seen) >= 2 else (False, False)
    monkeypatch.setattr(loop.jax, 'process_count', lambda: 2)
    monkeypatch.setattr('engine.distributed.agree', agree)
    run = FakeRun()
    with pytest.raises(errors.Preempted, match='step 10'):
        run.run()
    assert len(seen) == 2 and run.saved == [10]  # asked at steps 5 and 10 only


@pytest.mark.slow
def test_sigterm_then_same_command_honours_the_token_budget(tmp_path, corpus):
    budget = 40 * 16 * 32  # 40 steps of batch 16 x seq_len 32
    args = tiny_args(corpus, 200, f'--config.train_tokens={budget}',
                     '--config.max_runtime=3600')
    code, stderr = launch_and_signal(tmp_path, args, signal.SIGTERM, has_logged)
    assert code == 75, stderr
    steps = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 40, steps
    first = _meta(tmp_path, steps[0])['budget']
    assert first['tokens_seen'] == steps[0] * 512 and first['elapsed_seconds'] > 0

    result = launch(tmp_path, args)
    assert result.returncode == 0, result.stderr
    assert f'resuming from step {steps[0]}' in result.stdout
    last = max(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
    assert last == 40  # stopped by the budget, not num_train_steps=200
    meta = _meta(tmp_path, 40)['budget']
    assert meta['tokens_seen'] == budget
    assert meta['elapsed_seconds'] > first['elapsed_seconds']  # time of both attempts
    lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert max(r['step'] for r in records) == 40
    assert np.isfinite(records[-1]['eval_loss'])  # the run ended properly: final eval


def _meta(workdir: pathlib.Path, step: int) -> dict:
    path = workdir / 'checkpoints' / str(step) / 'meta' / 'metadata'
    return json.loads(path.read_text())
