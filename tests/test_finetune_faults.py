"""Fine-tuning killed (kill -9) at every kind of save point resumes to the results of an
uninterrupted run; SIGINT (Ctrl-C) saves and exits as SIGTERM does, in fine-tuning and
pretraining; the NaN advice names the keys of the stage's own config.

The faults are real: a `launch.py` subprocess whose functions are wrapped (by FAULT_HOOK
below, chosen by the FAULT environment variable) to SIGKILL or SIGINT the process itself
at a named point, so the kill lands exactly there and no `finally` runs.
"""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import time

import pytest

from engine import loop
from engine.rundir import step_dirs
from tests.helpers import REPO, env, launch_command, read_metrics, write_toy_task

# Run in the subprocess before launch.py. FAULT = 'POINT:STEP':
#   between_saves  checkpoints/STEP about to be saved, best/STEP (if any) on disk: SIGKILL
#   in_save        the background save of DIR/STEP has written its arrays, not yet renamed
#                  into place: SIGKILL (FAULT = 'in_save:DIR:STEP')
#   results        results.json half written: SIGKILL
#   sigint         SIGINT to itself when metrics of step STEP are written
FAULT_HOOK = '''
import os, signal
point, *where = os.environ.get('FAULT', 'none').split(':')
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == 'between_saves':
    from engine import checkpoint
    opened, init, save = [], checkpoint.Checkpoints.__init__, checkpoint.Checkpoints.save
    def tracked_init(self, *a, **k):
        init(self, *a, **k)
        opened.append(self)
    def killing_save(self, step, *a, **k):
        if self.directory.name == 'checkpoints' and step == int(where[0]):
            for other in opened:
                if other is not self:
                    other.wait()
            kill()
        return save(self, step, *a, **k)
    checkpoint.Checkpoints.__init__, checkpoint.Checkpoints.save = tracked_init, killing_save
elif point == 'in_save':
    import pathlib
    from orbax.checkpoint._src.checkpointers import async_checkpointer as ac
    wait = ac._background_wait_for_commit_futures
    def commit(directory, futures, *a, **k):
        path = pathlib.Path(str(directory))
        if path.parent.name == where[0] and path.name == where[1]:  # the final name
            for future in futures:
                future.result()
            kill()
        return wait(directory, futures, *a, **k)
    ac._background_wait_for_commit_futures = commit
elif point == 'results':
    from engine import rundir
    atomic = rundir.write_bytes_atomic
    def torn(path, data):
        if str(path).endswith('results.json'):
            with open(os.path.join(os.path.dirname(str(path)), '.tmp-torn'), 'wb') as f:
                f.write(data[:len(data) // 2])
            kill()
        return atomic(path, data)
    rundir.write_bytes_atomic = torn
elif point == 'sigint':
    from engine import metrics_writer
    write = metrics_writer.MetricWriter.write
    def signalling_write(self, step, record):
        write(self, step, record)
        if step == int(where[0]):
            os.kill(os.getpid(), signal.SIGINT)
    metrics_writer.MetricWriter.write = signalling_write
'''


def run(command: str, workdir, args, fault: str = 'none') -> subprocess.CompletedProcess:
    """`launch.py COMMAND --workdir WORKDIR ARGS` in a subprocess with FAULT injected."""
    cmd = launch_command(command, '--workdir', str(workdir), *args)
    # python -c 'HOOK; launcher', torch hidden before the hook imports anything
    cmd[2] = "import sys; sys.modules['torch'] = None" + FAULT_HOOK + cmd[2]
    return subprocess.run(cmd, cwd=REPO, env={**env(1), 'FAULT': fault}, capture_output=True,
                          text=True, timeout=600)


def finetune_args(pretrained: str, task: str) -> list[str]:
    # Regression, 5 steps an epoch (checkpoints at 5, 10, 15), validation after every step
    # by pearson: a new best at most evaluations, some of them at checkpoint steps.
    return ['--config', f'{REPO}/configs/finetune.py:custom', f'--config.init_from={pretrained}',
            f'--config.data.train_file={task}', '--config.task=regression',
            '--config.metric=pearson', '--config.num_epochs=3', '--config.batch_size=32',
            '--config.seq_len=16', '--config.learning_rate=2e-2', '--config.eval_every_steps=1',
            '--config.model.dropout_rate=0.1', '--config.log_every_steps=5']


def write_regression_task(root: pathlib.Path) -> str:
    """The toy task with 1.0 for 'warm' and 0.0 for 'cool'."""
    lines = pathlib.Path(write_toy_task(root, n=160)).read_text().splitlines()
    rows = [line.rsplit(',', 1) for line in lines[1:]]
    (root / 'regression.csv').write_text('text,label\n' + ''.join(
        f"{text},{1.0 if label == 'warm' else 0.0}\n" for text, label in rows))
    return str(root / 'regression.csv')


@pytest.fixture(scope='module')
def reference(tmp_path_factory, pretrained_run):
    """An uninterrupted fine-tuning run: (its args, its results.json, its best steps)."""
    root = tmp_path_factory.mktemp('ft-reference')
    args = finetune_args(pretrained_run, write_regression_task(root))
    result = run('finetune', root / 'run', args)
    assert result.returncode == 0, result.stderr
    assert step_dirs(root / 'run' / 'checkpoints') == [10, 15]
    bests, value = [], -2.0
    for record in read_metrics(root / 'run'):
        if record.get('eval_pearson', -2.0) > value:
            bests.append(record['step'])
            value = record['eval_pearson']
    return args, json.loads((root / 'run' / 'results.json').read_text()), bests


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_killed_at_every_save_point_resumes_to_the_same_results(tmp_path, reference):
    args, expected, bests = reference
    # Both saves at a checkpoint step: the later such one, and a best save after it.
    both = max(s for s in (5, 10) if s in bests)
    later = min(s for s in bests if s > both and s not in (10, 15))
    workdir = tmp_path / 'run'
    best, ckpts = workdir / 'best', workdir / 'checkpoints'
    # 1. Between the two saves: best/N on disk, checkpoints/N not. Every rerun used to
    #    stop with StepAlreadyExistsError (best/N is saved again).
    assert killed(run('finetune', workdir, args, f'between_saves:{both}'))
    assert both in step_dirs(best) and step_dirs(ckpts) == [5] * (both == 10)
    # 2. During the background save of a best: a half-written directory beside the others.
    result = run('finetune', workdir, args, f'in_save:best:{later}')
    assert killed(result), result.stderr
    assert set(step_dirs(ckpts)) <= {5, both} and later not in step_dirs(best)
    assert [p for p in best.iterdir() if p.name.startswith(f'{later}.')], list(best.iterdir())
    # 3. During the background save of the last checkpoint.
    assert killed(run('finetune', workdir, args, 'in_save:checkpoints:15'))
    assert step_dirs(ckpts) == [5, 10]
    assert not [p for p in best.iterdir() if not p.name.isdigit()]  # removed on opening
    # 4. Trained to the end, killed while writing results.json.
    assert killed(run('finetune', workdir, args, 'results'))
    assert step_dirs(ckpts) == [10, 15] and not (workdir / 'results.json').exists()
    # The same command completes, with the uninterrupted run's results.
    result = run('finetune', workdir, args)
    assert result.returncode == 0, result.stderr
    assert json.loads((workdir / 'results.json').read_text()) == expected
    assert step_dirs(best)[-1] == expected['best_step'] == bests[-1]  # predict reads it


@pytest.mark.slow
def test_ctrl_c_saves_and_the_same_command_resumes(tmp_path, reference):
    args, expected, _ = reference
    workdir = tmp_path / 'run'
    # Ctrl-C during the evaluation of step 6: seen after step 7, which is saved.
    result = run('finetune', workdir, args, 'sigint:6')
    assert result.returncode == loop.REQUEUE_EXIT_CODE, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        'SIGINT: saved a checkpoint at step 7; run the same command to resume')
    assert 'Traceback' not in result.stderr
    assert step_dirs(workdir / 'checkpoints') == [5, 7]
    result = run('finetune', workdir, args)
    assert result.returncode == 0, result.stderr
    assert json.loads((workdir / 'results.json').read_text()) == expected


@pytest.mark.slow
def test_ctrl_c_in_pretraining_saves_and_resumes(tmp_path, corpus):
    from tests.helpers import tiny_args
    args = tiny_args(corpus, 8)
    # Ctrl-C while step 4 is logged: seen after step 5, which is saved.
    result = run('pretrain', tmp_path, args, 'sigint:4')
    assert result.returncode == loop.REQUEUE_EXIT_CODE, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        'SIGINT: saved a checkpoint at step 5; run the same command to resume')
    assert step_dirs(tmp_path / 'checkpoints') == [5]
    result = run('pretrain', tmp_path, args)
    assert result.returncode == 0, result.stderr
    assert 'resuming from step 5' in result.stdout
    assert step_dirs(tmp_path / 'checkpoints')[-1] == 8


def test_second_ctrl_c_interrupts_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    # A signal's Python handler runs at the main thread's next check, which another thread
    # (pytest-xdist's) can delay: wait for it rather than assume it has run.
    with loop.SigtermFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while not flag.raised and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.raised and flag.name == 'SIGINT'
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # interrupted by the handler's KeyboardInterrupt
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_keyboard_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    import launch

    def interrupted(config, args):
        raise KeyboardInterrupt
    monkeypatch.setitem(launch.COMMANDS, 'predict',
                        dataclasses.replace(launch.COMMANDS['predict'], run=interrupted))
    assert launch.main(['predict', '--workdir', 'x', '--input', 'y', '--output', 'z']) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        'interrupted (Ctrl-C): stopped at once, nothing saved since the last checkpoint']


# --- the NaN advice names the stage's own keys ----------------------------------------------

def test_nan_hints_name_keys_of_their_stage():
    from configs import finetune, pretrain
    from engine.config_cli import apply_overrides
    from engine.errors import ConfigError
    from finetune.train import NAN_HINT
    for config, hint in ((pretrain.get_config('tiny'), loop.PRETRAIN_NAN_HINT),
                         (finetune.get_config('custom'), NAN_HINT)):
        keys = [w.strip('().,') for w in hint.split() if '_' in w]
        assert len(keys) == 2 + (hint is NAN_HINT), hint
        for key in keys:  # each one a key this stage's config accepts
            apply_overrides(config, [f'{key}=0.5'])
    # The pretraining hint's section keys are fine-tuning's too: the same setting.
    config = finetune.get_config('custom')
    apply_overrides(config, ['optimizer.learning_rate=0.5'])
    assert config.learning_rate == 0.5
    with pytest.raises(ConfigError):
        apply_overrides(config, ['optimizer.warmup_steps=5'])  # not a fine-tuning key


@pytest.mark.slow
def test_diverging_finetune_names_its_learning_rate_key(tmp_path, pretrained_run):
    task = write_toy_task(tmp_path, n=64)
    result = run('finetune', tmp_path / 'run', [
        '--config', f'{REPO}/configs/finetune.py:custom', f'--config.init_from={pretrained_run}',
        f'--config.data.train_file={task}', '--config.num_epochs=1', '--config.batch_size=16',
        '--config.seq_len=16', '--config.learning_rate=1e30', '--config.max_grad_norm=0',
        '--config.log_every_steps=1'])
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error: loss became nan') and last.endswith(
        'Try a lower learning_rate, more warm-up (warmup_fraction) or max_grad_norm.'), last

