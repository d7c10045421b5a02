"""Bad configs fail fast: one line naming the key, exit code 2, nothing written."""

import pytest

import launch
from tests.helpers import NO_SMALL_CORPUS


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / 'text.txt'
    path.write_text('a line of text\nanother line of text\n')
    return str(path)


@pytest.mark.parametrize('override, message', [
    ('--config.model.num_layer=3', "--config.model.num_layer: unknown config key (did you mean "
                                   "'model.num_layers'?)"),
    ('--config.model.num_heads=3', 'model: hidden_size=128 is not divisible by num_heads=3'),
    ('--config.batch_size=12', 'batch_size: 12 is not divisible by the data-parallel size 8'),
    ('--config.data.train_files=/nonexistent/*.txt', 'data.train_files: no file matches'),
    ('--config.data.tokenizer_model=/nonexistent.model', 'data.tokenizer_model: no such file'),
    ("--config.mesh.shape=(3,2)", 'mesh.shape: mesh.shape (3, 2, 1) needs 6 devices, but 8'),
    ('--config.seq_len=1024', 'seq_len: 1024 exceeds model.max_position_embeddings (512)'),
    ('--config.num_train_steps=0', 'num_train_steps: must be >= 1'),
])
def test_bad_config_gives_one_line_and_writes_nothing(tmp_path, capsys, corpus, override,
                                                      message):
    workdir = tmp_path / 'run'
    argv = ['pretrain', '--config', 'configs/pretrain.py:tiny', '--workdir', str(workdir),
            f'--config.data.train_files={corpus}', *NO_SMALL_CORPUS, override]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
    assert message in err
    assert not workdir.exists()


def test_unknown_size_in_config_arg(tmp_path, capsys):
    argv = ['pretrain', '--config', 'configs/pretrain.py:gigantic', '--workdir', str(tmp_path)]
    assert launch.main(argv) == 2
    assert 'unknown model size' in capsys.readouterr().err


def test_a_vocabulary_too_small_for_the_text_leaves_no_config_behind(tmp_path, capsys, corpus):
    workdir = tmp_path / 'run'
    argv = ['pretrain', '--config', 'configs/pretrain.py:tiny', '--workdir', str(workdir),
            f'--config.data.train_files={corpus}', *NO_SMALL_CORPUS,
            '--config.model.vocab_size=10']
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'model.vocab_size=10 is smaller than the number of ' in err
    assert not workdir.exists() or list(workdir.iterdir()) == []


@pytest.mark.parametrize('command', ['pretrain', 'prepare', 'finetune'])
def test_a_workdir_that_is_a_file_is_one_line(tmp_path, capsys, corpus, command):
    afile = tmp_path / 'afile'
    afile.write_text('mine')
    config = ('configs/finetune.py:sentiment' if command == 'finetune'
              else 'configs/pretrain.py:tiny')
    argv = [command, '--config', config, '--workdir', str(afile)]
    if command != 'finetune':
        argv += [f'--config.data.train_files={corpus}', *NO_SMALL_CORPUS]
    else:
        argv.append('--config.init_from=none')
    assert launch.main(argv) == 2
    assert capsys.readouterr().err == f'error: --workdir: {afile} exists and is not a directory\n'
    assert afile.read_text() == 'mine'
