"""Faults of the environment rather than of the input: a read-only workdir or output folder
is one `error:` line before any work; a GLUE task built by tfds in the wrong file format is
named as such."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

import launch
from engine.errors import ConfigError
from engine.paths import check_writable
from finetune import predict
from tests.helpers import NO_SMALL_CORPUS, REPO, write_toy_task


def _writable(folder: pathlib.Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@pytest.fixture
def read_only():
    """make(folder): folder and everything in it read-only for this process, undone at
    teardown. chmod does not stop root, so as root the folder is made immutable (chattr +i),
    which root obeys; the test is skipped only if neither can be done here."""
    made: list[pathlib.Path] = []
    as_root = os.geteuid() == 0

    def make(folder: pathlib.Path) -> pathlib.Path:
        if as_root:
            try:
                done = subprocess.run(['chattr', '-R', '+i', str(folder)], capture_output=True,
                                      text=True)
            except FileNotFoundError:
                pytest.skip('running as root (chmod does not stop writes) and chattr is absent')
            if done.returncode:
                pytest.skip(f'running as root and chattr +i is refused: {done.stderr.strip()}')
        else:
            for path in [*folder.rglob('*'), folder]:
                path.chmod(0o555 if path.is_dir() else 0o444)
        made.append(folder)
        if _writable(folder):
            pytest.skip(f'{folder} stays writable for this process')
        return folder

    yield make
    for folder in made:
        if as_root:
            subprocess.run(['chattr', '-R', '-i', str(folder)], check=True)
        else:
            for path in [folder, *folder.rglob('*')]:
                path.chmod(0o755 if path.is_dir() else 0o644)


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
            if p.is_file()}


def refused(capsys, argv: list) -> str:
    """launch.py ARGV stops with exit code 2 and one `error:` line; returns that line."""
    assert launch.main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), captured.err
    assert captured.out == ''
    return lines[0]


# ---------------------------------------------------------------- read-only paths


def pretrain_argv(workdir, corpus) -> list:
    return ['pretrain', '--workdir', workdir, f'--config.data.train_files={corpus}',
            '--config.num_train_steps=2', *NO_SMALL_CORPUS]


def finetune_argv(workdir, init_from='none') -> list:
    return ['finetune', '--config', 'configs/finetune.py:sentiment', '--workdir', workdir,
            f'--config.init_from={init_from}']


@pytest.mark.parametrize('command', ['pretrain', 'prepare', 'finetune', 'import'])
def test_a_new_workdir_in_a_read_only_folder_is_one_line(tmp_path, corpus, capsys, read_only,
                                                         command):
    parent = tmp_path / 'ro'
    parent.mkdir()
    read_only(parent)
    workdir = parent / 'run'
    argv = {'pretrain': pretrain_argv(workdir, corpus),
            'prepare': ['prepare', '--workdir', workdir, f'--config.data.train_files={corpus}',
                        *NO_SMALL_CORPUS],
            'finetune': finetune_argv(workdir),
            'import': ['import', '--hf-dir', tmp_path, '--workdir', workdir]}[command]
    message = refused(capsys, argv)
    assert message == (f'error: --workdir: cannot write in {parent}'
                       f'{f" (to create {workdir})" if command != "import" else ""}: '
                       f'{os.strerror(1 if os.geteuid() == 0 else 13)}; give a writable path '
                       'or fix its permissions')
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize('command', ['pretrain', 'finetune'])
def test_a_workdir_under_a_file_is_one_line(tmp_path, corpus, capsys, command):
    # Works as root too: no mode bit is involved, mkdir would fail with NotADirectoryError.
    afile = tmp_path / 'afile'
    afile.write_text('mine')
    workdir = afile / 'run'
    argv = pretrain_argv(workdir, corpus) if command == 'pretrain' else finetune_argv(workdir)
    assert refused(capsys, argv) == (f'error: --workdir: {workdir} cannot be created: {afile} '
                                     'is not a directory')
    assert afile.read_text() == 'mine'


def test_the_probe_leaves_nothing_and_skips_urls(tmp_path):
    check_writable(tmp_path / 'new' / 'deeper', '--workdir')
    check_writable(tmp_path, '--workdir')
    assert list(tmp_path.iterdir()) == []  # neither probed nor created
    check_writable('gs://bucket/run', '--workdir')  # no request: nothing to refuse
    with pytest.raises(ConfigError, match='exists and is not a directory'):
        (tmp_path / 'f').write_text('')
        check_writable(tmp_path / 'f', '--workdir')


def custom_finetune_argv(workdir, init_from, task) -> list:
    return ['finetune', '--workdir', workdir, '--config', f'{REPO}/configs/finetune.py:custom',
            f'--config.init_from={init_from}', f'--config.data.train_file={task}',
            '--config.num_epochs=1', '--config.batch_size=16', '--config.seq_len=16']


@pytest.fixture(scope='module')
def ft_run(tmp_path_factory, pretrained_run) -> tuple[pathlib.Path, str]:
    """A finished tiny fine-tuning run (1 epoch of a 64-row toy task), and its task."""
    root = tmp_path_factory.mktemp('ft')
    task = write_toy_task(root, n=64)
    assert launch.main([str(a) for a in custom_finetune_argv(root / 'run', pretrained_run,
                                                             task)]) == 0
    return root / 'run', task


@pytest.mark.slow
def test_resuming_a_read_only_pretraining_is_one_line_and_changes_nothing(
        tmp_path, corpus, capsys, read_only, pretrained_run):
    workdir = tmp_path / 'run'
    shutil.copytree(pretrained_run, workdir)
    before = snapshot(read_only(workdir))
    message = refused(capsys, pretrain_argv(workdir, corpus))
    assert message.startswith(f'error: --workdir: cannot write in {workdir}: ')
    assert snapshot(workdir) == before


@pytest.mark.slow
def test_resuming_a_read_only_finetuning_is_one_line_and_changes_nothing(
        tmp_path, capsys, read_only, pretrained_run, ft_run):
    workdir = tmp_path / 'run'
    shutil.copytree(ft_run[0], workdir)
    (workdir / 'results.json').unlink()  # as if interrupted: it would resume
    before = snapshot(read_only(workdir))
    message = refused(capsys, custom_finetune_argv(workdir, pretrained_run, ft_run[1]))
    assert message.startswith(f'error: --workdir: cannot write in {workdir}: ')
    assert snapshot(workdir) == before


@pytest.mark.slow
def test_export_into_a_read_only_folder_is_one_line(tmp_path, capsys, read_only,
                                                    pretrained_run):
    folder = tmp_path / 'ro'
    folder.mkdir()
    read_only(folder)
    message = refused(capsys, ['export', '--workdir', pretrained_run, '--output',
                               folder / 'hf', '--no-verify'])
    assert message.startswith(f'error: --output: cannot write in {folder}: ')
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_predict_into_a_read_only_folder_stops_before_any_work(tmp_path, capsys, read_only,
                                                               ft_run, monkeypatch):
    def load_run(*args, **kwargs):
        raise AssertionError('the run was loaded before the output was checked')
    monkeypatch.setattr(predict, 'load_run', load_run)
    src = tmp_path / 'in.txt'
    src.write_text('the red dog ran near the house .\n')
    folder = tmp_path / 'ro'
    folder.mkdir()
    read_only(folder)
    message = refused(capsys, ['predict', '--workdir', ft_run[0], '--input', src,
                               '--output', folder / 'p.jsonl'])
    assert message.startswith(f'error: --output: cannot write in {folder}: ')
    assert list(folder.iterdir()) == []


# ---------------------------------------------------------------- TFDS built as TFRecord


@pytest.fixture
def tfds_dir(tmp_path, monkeypatch) -> pathlib.Path:
    """An empty TFDS data dir, the only one tfds looks in."""
    root = tmp_path / 'tfds'
    root.mkdir()
    monkeypatch.setattr('tensorflow_datasets.core.constants.DATA_DIR', str(root))
    monkeypatch.setenv('TFDS_DATA_DIR', str(root))
    return root


def build_as_tfrecord(root: pathlib.Path) -> pathlib.Path:
    """glue/cola as `tfds build glue/cola` leaves it by default: TFRecord files. The stand-in
    builder writes array_record (TFRecord would need TensorFlow); the files are then renamed
    and the info relabelled, which is all that differs on disk for this purpose."""
    from tests.test_glue_suite import Glue
    from text.corpus import quiet_tfds
    with quiet_tfds():
        Glue(config='cola', data_dir=str(root)).download_and_prepare(file_format='array_record')
    version = root / 'glue' / 'cola' / '2.0.0'
    for path in version.glob('*.array_record-*'):
        path.rename(path.with_name(path.name.replace('.array_record-', '.tfrecord-')))
    info = json.loads((version / 'dataset_info.json').read_text())
    (version / 'dataset_info.json').write_text(json.dumps({**info, 'fileFormat': 'tfrecord'}))
    return version


def test_a_tfds_task_built_as_tfrecord_names_the_file_format(tfds_dir, tmp_path, capsys):
    version = build_as_tfrecord(tfds_dir)
    capsys.readouterr()  # the build's own lines
    assert sorted(p.name for p in version.glob('glue-*')) == [
        f'glue-{s}.tfrecord-00000-of-00001' for s in ('test', 'train', 'validation')]
    workdir = tmp_path / 'ft'
    message = refused(capsys, finetune_argv(workdir) + [
        '--config.data.train_file=tfds:glue/cola', '--config.data.text_column=sentence'])
    assert message == (
        f"error: data: train_file: TFDS dataset 'glue/cola' is prepared in {version} as tfrecord "
        'files, but it is read by index, which needs array_record: rebuild it with '
        '`tfds build glue/cola --file_format=array_record --overwrite` and copy the result '
        'there')
    assert not workdir.exists() or list(workdir.iterdir()) == []
    assert 'tensorflow' not in sys.modules


def test_a_missing_tfds_dataset_gives_the_array_record_build_command(tfds_dir):
    from text.corpus import open_tfds_split
    with pytest.raises(ValueError) as missing:
        open_tfds_split('tfds:glue/sst2', 'train', 'train_file')
    assert str(missing.value).startswith(
        f"train_file: TFDS dataset 'glue/sst2' split 'train' is not prepared under {tfds_dir}; "
        'prepare it with `tfds build glue/sst2 --file_format=array_record` on a machine with '
        'internet')
