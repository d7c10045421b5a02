"""A refused command changes nothing: one `error:` line, exit 2, and every file of the
existing workdir byte-identical afterwards (the whole tree hashed, nothing excluded).

Resumes that change what the checkpoints mean (engine/resume_check.py) are refused before
anything is written; allowed changes (budgets, cadences) still resume.
"""

import hashlib
import json
import pathlib
import shutil

import pytest

import launch
from configs.finetune import get_config as finetune_config
from configs.pretrain import get_config as pretrain_config
from engine import resume_check
from engine.config_cli import read_run_config
from engine.errors import ConfigError
from engine.rundir import RunDir
from finetune import setup
from tests.helpers import REPO, small_tokenizer, tiny_args, write_toy_task


def tree(root: pathlib.Path) -> dict[str, str]:
    """Every path under `root` -> the sha256 of its bytes ('dir' for a directory)."""
    out = {}
    for path in sorted(root.rglob('*')):
        key = str(path.relative_to(root))
        out[key] = 'dir' if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def refused(argv: list[str], capsys, *roots: pathlib.Path) -> str:
    """Runs launch.main(argv): exit 2, one `error:` line on stderr, `roots` unchanged.
    Returns the line."""
    before = [tree(r) for r in roots]
    capsys.readouterr()
    assert launch.main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), lines
    for root, saved in zip(roots, before, strict=True):
        assert tree(root) == saved, root
    return lines[0]


@pytest.fixture
def pretrained_copy(tmp_path, pretrained_run) -> pathlib.Path:
    """A copy of the session's tiny 10-step pretraining run (1 layer, 2 heads, vocab 128,
    batch 16, seq_len 32), to refuse resumes in."""
    return pathlib.Path(shutil.copytree(pretrained_run, tmp_path / 'run'))


@pytest.mark.parametrize('override, key, old, new', [
    ('model.num_heads=4', 'model.num_heads', '2', '4'),  # the shapes happen to fit
    ('model.num_layers=2', 'model.num_layers', '1', '2'),
    ('model.vocab_size=256', 'model.vocab_size', '128', '256'),
    ('batch_size=8', 'batch_size', '16', '8'),
    ('seq_len=64', 'seq_len', '32', '64'),
    ('masking.mask_rate=0.3', 'masking.mask_rate', '0.15', '0.3'),
    ('seed=1', 'seed', '0', '1'),
])
def test_pretrain_resume_that_changes_the_run_is_refused_and_writes_nothing(
        pretrained_copy, corpus, capsys, override, key, old, new):
    line = refused(['pretrain', '--workdir', pretrained_copy,
                    *tiny_args(corpus, 10, f'--config.{override}')], capsys, pretrained_copy)
    assert line == (f'error: {key}: the run in {pretrained_copy} was started with {old}, this '
                    f'config says {new}; a resume cannot change it (start a new workdir, or '
                    f'continue with --config.init_from={pretrained_copy})')


@pytest.mark.slow
def test_pretrain_resume_with_allowed_changes_continues(pretrained_copy, corpus, capsys):
    assert launch.main(['pretrain', '--workdir', str(pretrained_copy), *tiny_args(
        corpus, 12, '--config.log_every_steps=1', '--config.mesh.shape=(2,4)')]) == 0
    assert 'resuming from step 10' in capsys.readouterr().out
    assert RunDir(pretrained_copy).latest_step() == 12
    saved = read_run_config(pretrained_copy)  # the description follows the run
    assert saved.num_train_steps == 12 and saved.log_every_steps == 1


def fake_run(root: pathlib.Path, cfg, step: int) -> pathlib.Path:
    """A workdir holding `cfg` as config.json and a (dummy) checkpoint `step`: enough for
    the resume check, which reads no weights."""
    (root / 'checkpoints' / str(step)).mkdir(parents=True)
    RunDir(root).write_config(cfg.to_dict())
    return root


def test_a_planned_run_with_other_steps_is_refused_before_anything_is_written(
        tmp_path, corpus, capsys):
    args = tiny_args(corpus, 10, '--config.seq_len_phases=16:0.5,32:0.5')
    workdir = fake_run(tmp_path / 'run', launch.parse(['pretrain', '--workdir', 'x', *args])[1],
                       4)
    line = refused(['pretrain', '--workdir', workdir, *args[:2], '--config.num_train_steps=12',
                    *args[3:]], capsys, workdir)
    assert line.startswith('error: num_train_steps: the checkpoint was made with 10, now 12')


def test_an_imported_checkpoint_keeps_only_its_model(tmp_path):
    cfg = pretrain_config('tiny')
    workdir = fake_run(tmp_path / 'imported', cfg, 0)  # `launch.py import` saves step 0
    other = pretrain_config('tiny')
    other.data.train_files, other.seq_len = 'pydocs', 64  # no data consumed yet: free
    assert resume_check.check_pretrain(other.to_dict(), workdir) is None
    other.model.hidden_size = 256
    with pytest.raises(ConfigError, match='^model.hidden_size: the run in .* was started '
                                          'with 128, this config says 256'):
        resume_check.check_pretrain(other.to_dict(), workdir)


def test_a_key_the_saved_config_lacks_is_refused_and_the_allow_list_holds(tmp_path):
    cfg = pretrain_config('tiny')
    workdir = fake_run(tmp_path / 'run', cfg, 5)
    new = pretrain_config('tiny')
    new.num_train_steps, new.wandb.project, new.mesh.shape = 9999, 'p', (2, 4)
    assert resume_check.check_pretrain(new.to_dict(), workdir) is not None  # all allowed
    with new.unlocked():
        new.new_key = 1  # a key added to the configs later: refused by default
    with pytest.raises(ConfigError, match='^new_key: .* started with nothing'):
        resume_check.check_pretrain(new.to_dict(), workdir)


# ---------------------------------------------------------------- fine-tuning


def finetune_args(init_from, csv: str, *extra: str) -> list[str]:
    return ['--config', f'{REPO}/configs/finetune.py:custom', f'--config.init_from={init_from}',
            f'--config.data.train_file={csv}', '--config.num_epochs=1',
            '--config.batch_size=16', '--config.seq_len=16', '--config.log_every_steps=5',
            *extra]  # learning_rate: the custom default, 0 = auto (resolved on every run)


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, pretrained_run) -> tuple[pathlib.Path, str]:
    """(a finished tiny fine-tuning run, its task CSV)."""
    root = tmp_path_factory.mktemp('finetuned')
    csv = write_toy_task(root, n=120)
    workdir = root / 'run'
    assert launch.main(['finetune', '--workdir', str(workdir),
                        *finetune_args(pretrained_run, csv)]) == 0
    assert RunDir(workdir).latest_step() is not None
    return workdir, csv


@pytest.fixture
def interrupted(tmp_path, finetuned) -> pathlib.Path:
    """A copy of the fine-tuning run as if killed after its last checkpoint (no
    results.json): the next command resumes."""
    workdir = pathlib.Path(shutil.copytree(finetuned[0], tmp_path / 'ft'))
    (workdir / 'results.json').unlink()
    return workdir


@pytest.mark.slow
def test_finetune_resume_on_a_csv_that_gained_a_class_is_refused(
        interrupted, finetuned, pretrained_run, capsys):
    csv = pathlib.Path(finetuned[1])
    original = csv.read_bytes()
    try:  # the same file, one more class
        csv.write_bytes(original + b'the hot sun sat on the tree .,hot\n' * 3)
        line = refused(['finetune', '--workdir', interrupted,
                        *finetune_args(pretrained_run, str(csv))], capsys, interrupted)
    finally:
        csv.write_bytes(original)
    assert line.startswith(f'error: data: label_names: the run in {interrupted} was started '
                           'with ["cool", "warm"], now ["cool", "hot", "warm"] (task.json)')


@pytest.mark.slow
def test_finetune_resume_with_another_seq_len_is_refused(interrupted, finetuned,
                                                         pretrained_run, capsys):
    line = refused(['finetune', '--workdir', interrupted, *finetune_args(
        pretrained_run, finetuned[1], '--config.seq_len=32')], capsys, interrupted)
    assert line == (f'error: seq_len: the run in {interrupted} was started with 16, this '
                    'config says 32; a resume cannot change it (start a new workdir)')


@pytest.mark.slow
def test_finetune_resume_with_allowed_changes_finishes(interrupted, finetuned,
                                                       pretrained_run):
    assert launch.main(['finetune', '--workdir', str(interrupted), *finetune_args(
        pretrained_run, finetuned[1], '--config.log_every_steps=1', '--config.patience=3')]) == 0
    assert (interrupted / 'results.json').is_file()


@pytest.mark.slow
def test_finetune_with_a_tokenizer_of_another_vocabulary_is_refused(
        tmp_path, interrupted, finetuned, pretrained_run, capsys):
    other = small_tokenizer(tmp_path)  # 150 pieces; the pretrained run's has 128
    args = finetune_args(pretrained_run, finetuned[1], f'--config.tokenizer_model={other.path}')
    fresh = tmp_path / 'fresh'
    line = refused(['finetune', '--workdir', fresh, *args], capsys, tmp_path)
    assert line.startswith(f'error: tokenizer_model: {other.path} has another vocabulary than '
                           f'init_from {pretrained_run} (150 pieces against 128)')
    assert '--config.data.tokenizer_model=' in line and not fresh.exists()
    assert refused(['finetune', '--workdir', interrupted, *args], capsys, interrupted) == line


def test_finetune_with_the_init_from_tokenizer_given_is_accepted(pretrained_run):
    cfg = finetune_config('custom')
    cfg.init_from, cfg.tokenizer_model = pretrained_run, f'{pretrained_run}/spm.model'
    setup.check_init_from(cfg)  # the same vocabulary: nothing to refuse


# ---------------------------------------------------------------- export, import, predict


def test_export_refusals_leave_the_workdir_and_output_as_they_were(pretrained_copy,
                                                                    tmp_path, capsys):
    output = tmp_path / 'hf'
    output.mkdir()
    (output / 'keep.txt').write_text('mine\n')
    line = refused(['export', '--workdir', pretrained_copy, '--output', output], capsys,
                   pretrained_copy, output)
    assert line.startswith('error: --output: ')
    refused(['export', '--workdir', pretrained_copy, '--output', tmp_path / 'new', '--step',
             '999'], capsys, pretrained_copy)
    assert not (tmp_path / 'new').exists()
    refused(['export', '--workdir', tmp_path / 'hf', '--output', tmp_path / 'new'], capsys,
            output)  # not a run


def test_import_of_a_bad_hf_dir_leaves_an_existing_workdir_as_it_was(pretrained_copy,
                                                                     tmp_path, capsys):
    bad = tmp_path / 'bad_hf'
    bad.mkdir()
    (bad / 'config.json').write_text('{"model_type": "bert"')  # torn
    refused(['import', '--hf-dir', bad, '--workdir', pretrained_copy], capsys,
            pretrained_copy, bad)
    empty = tmp_path / 'empty'
    empty.mkdir()
    refused(['import', '--hf-dir', bad, '--workdir', empty], capsys, empty, bad)
    assert not list(empty.iterdir())
    refused(['import', '--hf-dir', tmp_path / 'missing', '--workdir', pretrained_copy],
            capsys, pretrained_copy)


@pytest.mark.slow
def test_predict_on_a_bad_input_leaves_the_run_as_it_was(finetuned, tmp_path, capsys):
    workdir = pathlib.Path(shutil.copytree(finetuned[0], tmp_path / 'ft'))
    refused(['predict', '--workdir', workdir, '--input', tmp_path / 'missing.txt'], capsys,
            workdir)
    bad = tmp_path / 'bad.csv'
    bad.write_text('title,label\nthe red dog ran .,warm\n')  # no text column
    out = tmp_path / 'out.jsonl'
    line = refused(['predict', '--workdir', workdir, '--input', bad, '--output', out], capsys,
                   workdir)
    assert 'text' in line and not out.exists()
    assert json.loads((workdir / 'task.json').read_text())['label_names'] == ['cool', 'warm']
