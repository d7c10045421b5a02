"""Fault injection: logged means that do not depend on checkpoint steps, a damaged newest
checkpoint (the run resumes from the older one), a disk that fills up during a save.

The end-to-end runs are in this process (launch.main, 8 fake devices) so that orbax can be
monkeypatched; runs are deterministic, so a resumed run's params equal an uninterrupted one's.
"""

import json
import pathlib
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.checkpointers import async_checkpointer

import launch
from engine import errors, loop
from engine.checkpoint import read_params_numpy, step_dirs
from finetune.unfreeze import phase_of_state
from tests.helpers import read_metrics, tiny_args, write_toy_task


def pretrain(workdir, *args) -> int:
    return launch.main(['pretrain', '--workdir', str(workdir), *args])


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --- 1. logged means ----------------------------------------------------------------------

def fake_loop(checkpoint_every: int, check_saves=lambda wait: None, num_steps: int = 8):
    """run_loop on host numbers (step i has loss i); returns (written records, saved steps)."""
    written, saved = [], []

    def step(state, batch):
        return state + 1, {'loss_sum': float(state + 1), 'correct_sum': 0.0, 'weight_sum': 1.0,
                           'learning_rate': 0.1, 'grad_norm': 1.0}
    callbacks = loop.LoopCallbacks(step=step, evaluate=lambda s: {},
                                   save=lambda step, s: saved.append(step),
                                   write=lambda step, m: written.append((step, m['loss'])),
                                   check_saves=check_saves)
    cfg = loop.LoopConfig(num_steps=num_steps, log_every=4, eval_every=0,
                          checkpoint_every=checkpoint_every, tokens_per_step=1,
                          flops_per_step=1.0, peak_flops=1.0, is_main=False)
    loop.run_loop(0, ((i, None) for i in range(num_steps)), 0, cfg, callbacks)
    return written, saved


def test_logged_mean_covers_every_step_of_the_interval():
    # Steps 1-4 have losses 1..4 (mean 2.5), steps 5-8 losses 5..8 (mean 6.5); a checkpoint
    # at step 3 or 6 used to drop the steps fetched for it from the next logged mean.
    written, saved = fake_loop(checkpoint_every=3)
    assert saved == [3, 6, 8]
    assert written == [(4, 2.5), (8, 6.5)] == fake_loop(checkpoint_every=100)[0]


def test_a_failed_background_save_stops_the_loop_at_the_next_step():
    calls = []

    def check_saves(wait):
        calls.append(wait)
        if len(calls) == 4:  # asked after step 4: the save of step 3 failed meanwhile
            raise errors.CheckpointSaveFailed('could not save the checkpoint of step 3')
    with pytest.raises(errors.CheckpointSaveFailed, match='step 3'):
        fake_loop(checkpoint_every=3, check_saves=check_saves)
    assert calls == [False] * 4  # asked after every step without waiting, until it failed
    # The last save is waited for: a run does not end "done" with its checkpoint unwritten.
    calls.clear()
    fake_loop(checkpoint_every=100, check_saves=lambda wait: calls.append(wait))
    assert calls == [False] * 7 + [True]


@pytest.mark.slow
def test_logged_losses_do_not_depend_on_checkpoint_every_steps(tmp_path, corpus):
    losses = {}
    for every in (3, 100):
        workdir = tmp_path / f'every-{every}'
        assert pretrain(workdir, *tiny_args(corpus, 8, '--config.log_every_steps=4',
                                            f'--config.checkpoint_every_steps={every}')) == 0
        losses[every] = [(r['step'], r['loss'], r['mlm_accuracy'])
                         for r in read_metrics(workdir) if 'loss' in r]
    assert step_dirs(tmp_path / 'every-3' / 'checkpoints') == [3, 6, 8]
    assert [r[0] for r in losses[3]] == [4, 8]
    assert losses[3] == losses[100]


# --- 2. a damaged newest checkpoint -------------------------------------------------------

def saved_at_10_and_20(corpus: str) -> list[str]:
    return tiny_args(corpus, 20, '--config.checkpoint_every_steps=10')


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, corpus):
    """An uninterrupted 20-step run with checkpoints at 10 and 20; its final params."""
    workdir = tmp_path_factory.mktemp('finished') / 'run'
    assert pretrain(workdir, *saved_at_10_and_20(corpus)) == 0
    assert step_dirs(workdir / 'checkpoints') == [10, 20]
    return workdir, read_params_numpy(str(workdir / 'checkpoints'), 20)


def truncate_array_files(step: pathlib.Path) -> None:
    """Every data file of the state cut to half (which of them a restore reads depends on
    orbax's layout: per-process databases, merged or not), as by a torn copy."""
    for path in (step / 'state').rglob('*'):
        if path.is_file() and path.parent.name == 'd':
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGE = {
    'truncated array files': truncate_array_files,
    'missing _METADATA': lambda step: (step / 'state' / '_METADATA').unlink(),
    'empty meta': lambda step: (step / 'meta' / 'metadata').write_bytes(b''),
    'garbled meta': lambda step: (step / 'meta' / 'metadata').write_text('{"data": {"se'),
}


@pytest.mark.slow
@pytest.mark.parametrize('damage', DAMAGE)
def test_damaged_newest_checkpoint_is_set_aside_and_the_older_one_resumes(
        tmp_path, corpus, finished_run, damage, capsys):
    finished, final_params = finished_run
    workdir = tmp_path / 'run'
    shutil.copytree(finished, workdir)
    DAMAGE[damage](workdir / 'checkpoints' / '20')
    capsys.readouterr()

    assert pretrain(workdir, *saved_at_10_and_20(corpus)) == 0  # the same command again
    out, err = capsys.readouterr()
    # One line, no traceback.
    assert len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(r'checkpoint 20 is unreadable \(.+\); moved to checkpoints/corrupt-20, '
                        r'resuming from step 10', err.strip()), err
    if damage == 'missing _METADATA':
        assert '(state/_METADATA is missing)' in err
    if damage.endswith('meta'):
        assert 'JSONDecodeError' in err
    assert 'resuming from step 10' in out
    # Kept aside, not deleted; step 20 trained again from step 10, to the same params.
    assert (workdir / 'checkpoints' / 'corrupt-20' / 'state').is_dir()
    assert step_dirs(workdir / 'checkpoints') == [10, 20]
    assert_same_params(read_params_numpy(str(workdir / 'checkpoints'), 20), final_params)


# --- 3. disk full during a save ------------------------------------------------------------

def no_space(*args, **kwargs):
    raise OSError(28, 'No space left on device')


def fail_in_background(monkeypatch):
    """The async part of the save of step 20 fails after its arrays are written (before the
    rename that makes the checkpoint): training has gone on meanwhile."""
    wait = async_checkpointer._background_wait_for_commit_futures

    def commit(directory, commit_futures, *args, **kwargs):
        if pathlib.Path(directory).name != '20':
            return wait(directory, commit_futures, *args, **kwargs)
        for future in commit_futures:
            future.result()
        no_space()
    monkeypatch.setattr(async_checkpointer, '_background_wait_for_commit_futures', commit)


def fail_when_starting(monkeypatch):
    """The save of step 20 fails in the call itself (creating its directory)."""
    save = ocp.CheckpointManager.save
    monkeypatch.setattr(ocp.CheckpointManager, 'save', lambda self, step, *a, **k: (
        no_space() if step == 20 else save(self, step, *a, **k)))


@pytest.mark.slow
@pytest.mark.parametrize('inject', [fail_in_background, fail_when_starting])
def test_disk_full_stops_the_run_and_keeps_the_last_good_checkpoint(
        tmp_path, corpus, inject, monkeypatch, capsys):
    # keep_checkpoints=1: the failed save of step 20 must not make room by deleting 10.
    args = tiny_args(corpus, 40, '--config.checkpoint_every_steps=10',
                     '--config.keep_checkpoints=1')
    inject(monkeypatch)
    assert pretrain(tmp_path, *args) == 1
    err = capsys.readouterr().err
    assert err.strip() == ('error: could not save the checkpoint of step 20 ([Errno 28] No space '
                           'left on device); the run stopped, its last good checkpoint is step 10')
    # Stopped at once (a failure in the background: once known, by the next save at the
    # latest), not on to step 40 without a checkpoint.
    assert step_dirs(tmp_path / 'checkpoints') == [10]
    last = max(r['step'] for r in read_metrics(tmp_path))
    assert last == 20 if inject is fail_when_starting else last <= 30
    assert all(np.isfinite(v).all()
               for v in read_params_numpy(str(tmp_path / 'checkpoints'), 10).values())
    # Space again: the same command resumes from the checkpoint kept.
    monkeypatch.undo()
    assert pretrain(tmp_path, *args) == 0
    assert 'resuming from step 10' in capsys.readouterr().out
    assert step_dirs(tmp_path / 'checkpoints') == [40]


# --- 4. NaN rollbacks ----------------------------------------------------------------------

def nan_loop(nan_rollbacks: int, bad_batches: set[int], num_steps: int = 8, log_every: int = 2,
             checkpoint_every: int = 2, rates: dict | None = None):
    """run_loop on host numbers where the state is the optimizer step and the batch of data
    index i is i + 1 (its 1-based number); the loss is NaN on `bad_batches`. Returns (the
    batches trained on, per step, of the surviving history; written records; saved steps
    with their data offset; final state). `rates`: filled with {step: the host learning rate
    it was given} from a learning_rate callback of 10 x the steps taken before it."""
    trained, written, saved, offset = {}, [], [], [0]
    snapshots = {}

    def step(state, batch, *rate):
        trained[state + 1] = batch
        if rates is not None:
            rates[state + 1] = rate
        loss = float('nan') if batch in bad_batches else 1.0
        return state + 1, {'loss_sum': loss, 'correct_sum': 0.0, 'weight_sum': 1.0,
                           'learning_rate': 0.1, 'grad_norm': 1.0}

    def batches(start):
        return ((i, i + 1) for i in range(start, 10 * num_steps))

    def save(step, state):
        snapshots[step] = state
        saved.append((step, offset[0]))

    def rollback(step, new_offset):
        offset[0] = new_offset
        return snapshots[step], batches(step + new_offset)
    callbacks = loop.LoopCallbacks(step=step, evaluate=lambda s: {}, save=save,
                                   write=lambda step, m: written.append({'step': step, **m}),
                                   rollback=rollback,
                                   learning_rate=None if rates is None else lambda s: 10 * s)
    cfg = loop.LoopConfig(num_steps=num_steps, log_every=log_every, eval_every=0,
                          checkpoint_every=checkpoint_every, tokens_per_step=1,
                          flops_per_step=1.0, peak_flops=1.0, is_main=True,
                          nan_rollbacks=nan_rollbacks)
    final = loop.run_loop(0, batches(0), 0, cfg, callbacks)
    return trained, written, saved, final


def test_nan_rollback_restores_the_checkpoint_and_skips_the_batches(capsys):
    # Checkpoints at 2, 4, ...; batch 3 (step 3) is bad: detected at the log step 4, back
    # to step 2, batches 3 skipped; steps 3.. train on batches 4...
    trained, written, saved, final = nan_loop(1, {3}, checkpoint_every=2, log_every=4)
    assert final == 8
    assert trained == {1: 1, 2: 2, 3: 4, 4: 5, 5: 6, 6: 7, 7: 8, 8: 9}
    assert {'step': 3, 'rollback_to': 2, 'skipped_batches': [3]} in written
    assert saved == [(2, 0), (4, 1), (6, 1), (8, 1)]
    out = capsys.readouterr().out
    assert 'step 3: loss is nan; rolled back to step 2 and skipped batches 3-3 ' \
           '(rollback 1 of 1)' in out
    # Logged means cover steps 1-4 and 5-8 of the surviving history, all finite.
    assert [(r['step'], r['loss']) for r in written if 'loss' in r] == [(4, 1.0), (8, 1.0)]


def test_host_learning_rate_follows_the_optimizer_step_across_a_rollback():
    # schedule=budget's rate is asked for by step: after skipping batch 3, step 3 trains on
    # batch 4 with the rate of step 3 (not of data index 4).
    rates = {}
    trained, _, _, _ = nan_loop(1, {3}, checkpoint_every=2, log_every=4, rates=rates)
    assert trained[3] == 4
    assert rates == {n: (10 * (n - 1),) for n in range(1, 9)}


def test_nan_rollbacks_are_limited_and_zero_stops_at_once():
    with pytest.raises(errors.NonFiniteLoss, match=r'loss became nan by step 4; stopped'):
        nan_loop(0, {3})
    # Two bad batches, one rollback allowed: the second one stops the run.
    with pytest.raises(errors.NonFiniteLoss, match=r'by step 6 after 1 rollback\(s\).*step 4'):
        nan_loop(1, {3, 7}, checkpoint_every=2, log_every=2)
    # Two allowed: both survived; the skipped batches follow the offset of the first.
    trained, written, saved, final = nan_loop(2, {3, 7})
    assert final == 8
    rollbacks = [r for r in written if 'rollback_to' in r]
    assert rollbacks == [{'step': 3, 'rollback_to': 2, 'skipped_batches': [3]},
                         {'step': 6, 'rollback_to': 4, 'skipped_batches': [6, 7]}]
    assert trained[5] == 8 and trained[8] == 11
    assert saved[-1] == (8, 3)


def test_nan_before_any_checkpoint_stops_the_run():
    with pytest.raises(errors.NonFiniteLoss, match='last good checkpoint: none yet'):
        nan_loop(1, {1}, checkpoint_every=4, log_every=2)


POISON = 7  # a batch of input_ids all POISON: the step's loss and params become NaN


def poison_batch(monkeypatch, index: int) -> None:
    """Data index `index` (batch number index + 1) blows the model up, in whichever step
    trains on it (a data-dependent fault: a rollback that skips it gets past it)."""
    import jax.numpy as jnp

    from engine import step as step_lib
    from text.batches import PretrainBatches
    batch, train_step = PretrainBatches.batch, step_lib.train_step

    def poisoned_batch(self, step):
        out = batch(self, step)
        return {**out, 'input_ids': np.full_like(out['input_ids'], POISON)} if step == index \
            else out

    def poisoned_step(state, batch, **kwargs):
        state, metrics = train_step(state, batch, **kwargs)
        bad = jnp.all(batch['input_ids'] == POISON)
        params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), state.params)
        metrics = {**metrics, 'loss_sum': jnp.where(bad, jnp.nan, metrics['loss_sum'])}
        return state.replace(params=params), metrics
    monkeypatch.setattr(PretrainBatches, 'batch', poisoned_batch)
    monkeypatch.setattr(step_lib, 'train_step', poisoned_step)


def data_position(workdir, step: int) -> int:
    meta = json.loads((workdir / 'checkpoints' / str(step) / 'meta' / 'metadata').read_text())
    return meta['data']['position']


@pytest.mark.slow
def test_nan_rollback_end_to_end(tmp_path, corpus, monkeypatch, capsys):
    # Checkpoints at 4, 8, 12; the batch of step 6 (data index 5) is poisoned: found at the
    # log step 6, back to step 4, batches 5-6 skipped.
    args = tiny_args(corpus, 12, '--config.checkpoint_every_steps=4')
    poison_batch(monkeypatch, 5)
    assert pretrain(tmp_path / 'stop', *args) == 1  # nan_rollbacks=0: stops as before
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('error: loss became nan by step 6; stopped'), err
    assert 'last good checkpoint: step 4' in err
    assert step_dirs(tmp_path / 'stop' / 'checkpoints') == [4]

    workdir = tmp_path / 'rollback'
    assert pretrain(workdir, *args, '--config.nan_rollbacks=1') == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if 'rolled back' in line]
    assert lines == ['step 6: loss is nan; rolled back to step 4 and skipped batches 5-6 '
                     '(rollback 1 of 1)'], out
    records = read_metrics(workdir)
    assert {'step': 6, 'rollback_to': 4, 'skipped_batches': [5, 6]} in records
    assert max(r['step'] for r in records) == 12
    assert np.isfinite([r['loss'] for r in records if 'loss' in r]).all()
    assert step_dirs(workdir / 'checkpoints') == [4, 8, 12]
    params = read_params_numpy(str(workdir / 'checkpoints'), 12)
    assert all(np.isfinite(v).all() for v in params.values())
    # The offset is in the checkpoints: resumed from step 8, the run replays the same data
    # (the poisoned batch is not seen again) and ends with the same params.
    assert [data_position(workdir, s) for s in (4, 8, 12)] == [4, 10, 14]
    resumed = tmp_path / 'resumed'
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / 'checkpoints' / '12')
    assert pretrain(resumed, *args, '--config.nan_rollbacks=1') == 0
    assert 'rolled back' not in capsys.readouterr().out
    assert_same_params(read_params_numpy(str(resumed / 'checkpoints'), 12), params)


def finetune(workdir, task: str, init_from: str, *extra: str) -> int:
    return launch.main(['finetune', '--workdir', str(workdir), '--config',
                        'configs/finetune.py:custom', f'--config.init_from={init_from}',
                        f'--config.data.train_file={task}', '--config.num_epochs=3',
                        '--config.batch_size=16', '--config.seq_len=16', *extra])


@pytest.mark.slow
@pytest.mark.parametrize('unfreeze', [0, 4])
def test_finetune_resumes_from_the_older_checkpoint_when_the_newest_is_damaged(
        tmp_path, pretrained_run, capsys, unfreeze):
    # Checkpoints every epoch (3 steps), the last two kept. Damage the newest, drop
    # results.json: the rerun sets it aside, retrains the last epoch from the older one and
    # ends with the results of the uninterrupted run (also across an unfreezing phase).
    task = write_toy_task(tmp_path, n=64)
    args = (f'--config.gradual_unfreeze_steps={unfreeze}', '--config.model.dropout_rate=0.1')
    workdir = tmp_path / 'run'
    assert finetune(workdir, task, pretrained_run, *args) == 0
    first = json.loads((workdir / 'results.json').read_text())
    steps = step_dirs(workdir / 'checkpoints')
    assert len(steps) == 2, steps
    if unfreeze:  # the fallback crosses a phase boundary (1 layer: phases 0..2)
        assert [phase_of_state(s, unfreeze, 1) for s in steps] == [1, 2]
    (workdir / 'results.json').unlink()
    truncate_array_files(workdir / 'checkpoints' / str(steps[-1]))
    capsys.readouterr()

    assert finetune(workdir, task, pretrained_run, *args) == 0
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf'checkpoint {steps[-1]} is unreadable \(.+\); moved to '
                        rf'checkpoints/corrupt-{steps[-1]}, resuming from step {steps[0]}',
                        err), err
    assert (workdir / 'checkpoints' / f'corrupt-{steps[-1]}' / 'state').is_dir()
    assert json.loads((workdir / 'results.json').read_text()) == first
