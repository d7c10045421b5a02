"""gs:// workdirs end to end against a local GCS server (tests/fake_gcs.py): pretraining,
its resume, fine-tuning from a gs:// init_from, prediction and export read and write
only the bucket, and give exactly what the same runs give on a local disk."""

import json

import numpy as np
import pytest
from etils import epath

import launch
from engine.errors import ConfigError
from engine.metrics_writer import MetricWriter
from engine.paths import local_dir
from tests.fake_gcs import fake_gcs
from tests.helpers import REPO, read_metrics, tiny_args, write_toy_task

STEPS, BATCH, SEQ = 10, 16, 32  # as conftest's pretrained_run; tiny_args' batch and length


@pytest.fixture(scope='module')
def bucket():
    with fake_gcs() as url:
        yield url


def losses(workdir) -> list[tuple]:
    """(step, training loss) of every logged step, and the final held-out loss."""
    records = read_metrics(workdir)
    return ([(r['step'], r['loss']) for r in records if 'loss' in r]
            + [records[-1]['eval_loss']])


def finetune_args(init_from: str, task: str) -> list[str]:
    return ['--config', f'{REPO}/configs/finetune.py:custom', f'--config.init_from={init_from}',
            f'--config.data.train_file={task}', '--config.num_epochs=1',
            '--config.batch_size=16', '--config.seq_len=16', '--config.log_every_steps=5',
            '--config.model.pooling=cls']  # exportable


@pytest.mark.slow
def test_runs_in_a_bucket_match_runs_on_disk(bucket, corpus, pretrained_run, tmp_path,
                                             monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    local, remote = pretrained_run, f'{bucket}/pre'  # local: the same run, uninterrupted
    args = tiny_args(corpus, STEPS)
    # Interrupted by the token budget at step 4 (it saves there), then continued by the
    # plain command.
    budget = f'--config.train_tokens={4 * BATCH * SEQ}'
    assert launch.main(['pretrain', '--workdir', remote, *args, budget]) == 0
    assert sorted(p.name for p in epath.Path(remote, 'checkpoints').iterdir()) == ['4']
    assert launch.main(['pretrain', '--workdir', remote, *args]) == 0

    assert losses(remote) == losses(local)
    files = {p.name for p in epath.Path(remote).iterdir()}
    assert {'config.json', 'spm.model', 'metrics.jsonl', 'checkpoints', 'tensorboard'} <= files
    assert len(list(epath.Path(remote, 'tensorboard').iterdir())) == 2  # one per attempt

    task = write_toy_task(tmp_path, n=120)
    results = {}
    for name, init_from in (('local', str(local)), ('remote', remote)):
        workdir = str(tmp_path / 'ft') if name == 'local' else f'{bucket}/ft'
        assert launch.main(['finetune', '--workdir', workdir,
                            *finetune_args(init_from, task)]) == 0
        results[name] = json.loads(epath.Path(workdir, 'results.json').read_text())
    assert results['remote']['validation'] == results['local']['validation']

    texts = tmp_path / 'texts.txt'
    texts.write_text('the red cat sat on the tree .\nthe blue dog ran under the house .\n')
    for name, workdir in (('local', tmp_path / 'ft'), ('remote', f'{bucket}/ft')):
        out = tmp_path / f'{name}.jsonl'
        assert launch.main(['predict', '--workdir', str(workdir), '--input', str(texts),
                            '--output', str(out)]) == 0
    assert (tmp_path / 'remote.jsonl').read_text() == (tmp_path / 'local.jsonl').read_text()
    assert launch.main(['export', '--workdir', remote, '--output', str(tmp_path / 'hf'),
                        '--no-verify']) == 0  # tests/test_convert.py checks the files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ['ft', 'task.csv', 'texts.txt', 'local.jsonl', 'remote.jsonl', 'hf'])


def test_prepared_data_in_a_bucket_is_shared_and_read_in_place(bucket, corpus,
                                                                pretrained_run, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv('BERTJAX_CACHE', str(tmp_path / 'cache'))
    workdir = tmp_path / 'run'
    assert launch.main(['pretrain', '--workdir', str(workdir), *tiny_args(corpus, STEPS),
                        f'--config.data.data_dir={bucket}/prepared']) == 0
    assert losses(workdir) == losses(pretrained_run)  # the same data as prepared on disk
    (remote,) = list(epath.Path(bucket, 'prepared').iterdir())
    names = {p.name for p in remote.iterdir()}
    assert {'index.json', 'unit-00000.json', 'train-00000-0000.array_record'} <= names
    # No shard is copied to this host: its cache holds only the records it read.
    (cache,) = (tmp_path / 'cache').iterdir()
    assert cache.name == 'records'
    assert not any(p.suffix == '.array_record' for p in cache.rglob('*'))
    assert not (workdir / 'data').exists()


def test_metric_writer_uploads_on_its_schedule_and_truncates_on_resume(bucket):
    workdir = f'{bucket}/writer'
    target = epath.Path(workdir, 'metrics.jsonl')
    writer = MetricWriter(workdir, upload_every_s=3600)
    writer.write(1, {'loss': 2.0})
    assert not target.exists()  # staged locally until the next upload
    writer.write(2, {'loss': np.float32(1.5)})
    writer.close()
    assert [json.loads(x)['step'] for x in target.read_text().splitlines()] == [1, 2]

    writer = MetricWriter(workdir, resume_step=1, upload_every_s=0)  # resumed at step 1
    writer.write(2, {'loss': 1.25})
    assert [json.loads(x) for x in target.read_text().splitlines()] == [
        {'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.25}]
    writer.close()


def test_multi_run_commands_refuse_a_bucket_workdir(tmp_path):
    with pytest.raises(ConfigError, match='search writes to a local directory'):
        local_dir('gs://bucket/sweep', 'search')
    assert local_dir(str(tmp_path / 'x'), 'suite') == tmp_path / 'x'


@pytest.mark.parametrize('argv, flag', [
    (['export', '--workdir', 'runs/x', '--output', 'gs://bucket/hf'], '--output'),
    (['import', '--hf-dir', 'gs://bucket/hf', '--workdir', 'runs/y'], '--hf-dir'),
    (['import', '--hf-dir', 'hf', '--workdir', 'gs://bucket/run'], '--workdir'),
    (['predict', '--workdir', 'runs/ft', '--input', 'in.txt', '--output', 'gs://b/p.jsonl'],
     '--output'),
])
def test_commands_writing_local_files_refuse_a_url_before_any_work(argv, flag, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {flag}: launch.py {argv[0]} ') and err.count('\n') == 1
    assert list(tmp_path.iterdir()) == []  # no './gs:' folder, nothing else either


def test_a_bucket_workdir_is_locked_too(bucket):
    from engine.lock import WorkdirLock
    workdir = f'{bucket}/locked'
    with WorkdirLock(workdir, 'pretrain'):
        assert epath.Path(workdir, '.lock').exists()
        with pytest.raises(ConfigError, match='is in use by pretrain'):
            WorkdirLock(workdir, 'finetune').acquire()
    assert not epath.Path(workdir, '.lock').exists()
