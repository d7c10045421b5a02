"""Fine-tuning end to end through `launch.py`: restore across meshes, learn, predict."""

import json

import numpy as np
import pytest

import launch
from tests.helpers import REPO, sentence, tiny_args
from tests.helpers import launch as launch_run

WARM = {'red', 'big', 'old', 'quiet'}  # the label depends on the adjective alone


def _sentence(rng) -> tuple[str, str]:
    text, adjective = sentence(rng)
    return text, 'warm' if adjective in WARM else 'cool'


@pytest.fixture(scope='module')
def task_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp('task')
    rng = np.random.default_rng(1)
    files = {}
    for split, n in (('train', 480), ('validation', 64), ('test', 96)):
        rows = [_sentence(rng) for _ in range(n)]
        lines = ['text,label'] + [f'{t},{label}' for t, label in rows]
        (root / f'{split}.csv').write_text('\n'.join(lines) + '\n')
        files[split] = str(root / f'{split}.csv')
    return files


def pretrain(workdir, corpus, devices: int, *extra: str) -> None:
    result = launch_run(workdir, tiny_args(corpus, 10, *extra), devices=devices)
    assert result.returncode == 0, result.stderr


def finetune_args(init_from, files, *extra) -> list[str]:
    return ['--config', f'{REPO}/configs/finetune.py:custom', f'--config.init_from={init_from}',
            f'--config.data.train_file={files["train"]}',
            f'--config.data.validation_file={files["validation"]}',
            f'--config.data.test_file={files["test"]}', '--config.num_epochs=3',
            '--config.batch_size=16', '--config.seq_len=16', '--config.learning_rate=2e-3',
            '--config.log_every_steps=10', *extra]


def run_launch(command: str, workdir, args, devices: int):
    return launch_run(workdir, args, devices=devices, command=command)


@pytest.mark.slow
def test_pretrained_on_2x4_mesh_finetunes_on_one_device_and_predicts(tmp_path, corpus,
                                                                      task_files):
    # Pretrained in this process (8 fake devices), fine-tuned in a 1-device subprocess.
    assert launch.main(['pretrain', '--workdir', str(tmp_path / 'pre'),
                        *tiny_args(corpus, 10, '--config.mesh.shape=(2,4)')]) == 0
    ft = tmp_path / 'ft'
    result = run_launch('finetune', ft, finetune_args(tmp_path / 'pre', task_files), 1)
    assert result.returncode == 0, result.stderr
    assert 'params: ' in result.stdout and ' 0 frozen' in result.stdout
    results = json.loads((ft / 'results.json').read_text())
    assert results['test']['accuracy'] > 0.8 and results['test']['f1'] > 0.8, results
    assert results['label_names'] == ['cool', 'warm']
    assert (ft / 'best').is_dir() and list((ft / 'tensorboard').glob('events.*'))
    evals = [json.loads(line) for line in (ft / 'metrics.jsonl').read_text().splitlines()
             if 'eval_f1' in line]
    assert len(evals) == 3  # one per epoch
    again = run_launch('finetune', ft, finetune_args(tmp_path / 'pre', task_files), 1)
    assert again.returncode == 0 and 'this run is complete' in again.stdout

    texts = tmp_path / 'new.txt'
    texts.write_text('the red dog ran near the house .\nthe blue fish sat on the tree .\n')
    out = tmp_path / 'predictions.jsonl'
    result = run_launch('predict', ft, ['--input', str(texts), '--output', str(out)], 1)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['label'] for r in rows] == ['warm', 'cool']
    for row in rows:
        assert sum(row['probabilities'].values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_pretrained_on_one_device_linear_probe_on_2x4_mesh(tmp_path, corpus, task_files):
    pretrain(tmp_path / 'pre', corpus, 1)
    result = run_launch('finetune', tmp_path / 'ft', finetune_args(
        tmp_path / 'pre', task_files, '--config.freeze=encoder', '--config.mesh.shape=(2,4)',
        '--config.num_epochs=1'), 8)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith('params: '))
    trainable = int(line.split()[1].replace(',', ''))
    frozen = int(line.split(', ')[1].split()[0].replace(',', ''))
    hidden, labels = 32, 2  # pooler (H*H + H) and classifier (H*2 + 2) train
    assert trainable == hidden * hidden + hidden + hidden * labels + labels
    assert frozen > 10 * trainable
    optimizer_bytes = int(line.split('optimizer state: ')[1].split()[0].replace(',', ''))
    assert optimizer_bytes < 2 * 4 * trainable + 1024  # two Adam moments, a few counters
    assert json.loads((tmp_path / 'ft' / 'results.json').read_text())['test']['accuracy'] > 0


def test_bad_rows_are_reported_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / 'bad.csv'
    bad.write_text('text,label\nfine text,pos\n,neg\n')
    argv = ['finetune', '--config', 'configs/finetune.py:custom', '--workdir',
            str(tmp_path / 'ft'), '--config.init_from=none', f'--config.data.train_file={bad}']
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert f'{bad}, line 3' in err and 'empty or missing text' in err
    assert not (tmp_path / 'ft').exists()


@pytest.mark.slow
def test_regression_from_scratch_with_early_stopping(tmp_path):
    """Random init, a tokenizer trained on the task text, a numeric target, patience 1."""
    rng = np.random.default_rng(2)
    rows = []
    for _ in range(300):
        text, adjective = sentence(rng)
        rows.append(f'{text},{1.0 if adjective in WARM else -1.0}')
    train = tmp_path / 'train.csv'
    train.write_text('text,score\n' + '\n'.join(rows) + '\n')
    result = run_launch('finetune', tmp_path / 'ft', [
        '--config', f'{REPO}/configs/finetune.py:custom', '--config.init_from=none',
        '--config.task=regression', f'--config.data.train_file={train}',
        '--config.data.label_column=score', '--config.model.num_layers=1',
        '--config.model.hidden_size=32', '--config.model.intermediate_size=64',
        '--config.model.vocab_size=128', '--config.seq_len=16', '--config.batch_size=16',
        '--config.learning_rate=2e-3', '--config.num_epochs=6', '--config.metric=pearson',
        '--config.eval_every_steps=4', '--config.patience=1'], 1)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / 'ft' / 'results.json').read_text())
    assert set(results['validation']) >= {'pearson', 'spearman', 'mse'}
    evals = [json.loads(line) for line in (tmp_path / 'ft' / 'metrics.jsonl').read_text()
             .splitlines() if 'eval_pearson' in line]
    steps_per_epoch = 270 // 16 + 1  # 30 of 300 rows carved off for validation
    assert evals[-1]['step'] < 6 * steps_per_epoch  # stopped early
    assert evals[-1]['eval_pearson'] < max(e['eval_pearson'] for e in evals[:-1]) + 1e-9
