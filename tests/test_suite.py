"""The multi-seed harness (`launch.py evaluate`): configs per run, tables, resume."""

import csv
import json

import numpy as np
import pytest

import launch
from engine.config_cli import apply_overrides, load_config
from engine.errors import ConfigError
from studies import suite
from tests.helpers import REPO, write_toy_task


def _suite(*overrides: str):
    cfg = load_config(f'{REPO}/configs/suite.py:quick')
    apply_overrides(cfg, list(overrides))
    return cfg


def test_run_config_layers_task_variant_and_seed():
    cfg = _suite('init_from=/pre', 'variants.probe=freeze=encoder learning_rate=1e-3')
    run = suite.run_config(cfg, 'sentiment_2k', 'probe', 7)
    assert (run.init_from, run.seed, run.freeze, run.learning_rate) == ('/pre', 7, 'encoder',
                                                                        1e-3)
    assert (run.data.max_train_examples, run.num_epochs) == (2000, 5)  # the task's overrides
    scratch = suite.run_config(cfg, 'sentiment_2k', 'scratch', 0)
    assert scratch.init_from == 'none' and scratch.tokenizer_model == '/pre/spm.model'


def test_scratch_baseline_of_an_imported_wordpiece_run_uses_its_vocabulary(tmp_path):
    (tmp_path / 'wordpiece.json').write_text('{}')
    cfg = _suite(f'init_from={tmp_path}')
    scratch = suite.run_config(cfg, 'sentiment_2k', 'scratch', 0)
    assert scratch.tokenizer_model == str(tmp_path / 'wordpiece.json')


def test_scratch_baseline_takes_the_pretrained_architecture(tmp_path):
    from configs.pretrain import get_config as pretrain_config
    from engine.rundir import RunDir
    RunDir(tmp_path).write_config(pretrain_config('tiny,recipe=modern').to_dict())
    cfg = _suite(f'init_from={tmp_path}', 'variants.scratch_mean=init_from=none model.pooling=mean')
    scratch = suite.run_config(cfg, 'sentiment_2k', 'scratch', 0)
    m = scratch.model
    assert (m.position_embedding, m.mlp, m.use_bias, m.intermediate_size) == ('rope', 'geglu',
                                                                            False, 320)
    assert (m.dropout_rate, m.pooling) == (0.1, 'cls')  # fine-tuning's own keys are kept
    assert suite.run_config(cfg, 'sentiment_2k', 'scratch_mean', 0).model.pooling == 'mean'
    assert suite.run_config(cfg, 'sentiment_2k', 'pretrained', 0).model.mlp == 'gelu'  # unused


def test_bad_entries_name_the_key():
    with pytest.raises(ConfigError, match='learning_rat'):
        suite.run_config(_suite('variants.x=learning_rat=1'), 'sentiment_2k', 'x', 0)
    with pytest.raises(ConfigError, match='expected key=value'):
        suite.run_config(_suite('variants.x=freeze'), 'sentiment_2k', 'x', 0)
    with pytest.raises(ConfigError, match='unknown config key'):
        _suite('seedz=(1,)')


def test_summarize_mean_and_sample_std():
    rows = [{'task': 't', 'variant': 'v', 'seed': s, 'accuracy': a, 'f1': f}
            for s, a, f in ((0, 0.5, 0.4), (1, 0.7, 0.6), (2, 0.6, 0.8))]
    [row] = suite.summarize(rows, ('accuracy', 'f1'))
    assert row['seeds'] == 3
    assert row['accuracy_mean'] == pytest.approx(0.6) and row['accuracy_std'] == pytest.approx(0.1)
    assert row['f1_mean'] == pytest.approx(0.6) and row['f1_std'] == pytest.approx(0.2)
    [single] = suite.summarize(rows[:1], ('accuracy',))
    assert single['accuracy_std'] == 0.0


def _task_file(root) -> str:
    return write_toy_task(root, 200, seed=3)


@pytest.mark.slow
def test_evaluate_end_to_end_writes_tables_and_resumes(tmp_path, pretrained_run, capsys):
    pre = pretrained_run
    task = (f'custom data.train_file={_task_file(tmp_path)} num_epochs=1 batch_size=16 '
            'seq_len=16 learning_rate=2e-3 model.dropout_rate=0 '
            'model.attention_dropout_rate=0 log_every_steps=10')
    argv = ['evaluate', '--config', f'{REPO}/configs/suite.py:quick', '--workdir',
            str(tmp_path / 'eval'), f'--config.init_from={pre}',
            '--config.tasks.sentiment_2k=custom data.train_file=/nonexistent.csv',
            f'--config.tasks.toy={task}', '--config.seeds=(1,)']
    assert launch.main(argv) == 2  # every run is validated before any trains
    assert 'sentiment_2k / pretrained / seed 1: data:' in capsys.readouterr().err
    assert not (tmp_path / 'eval').exists()
    argv[6] = '--config.tasks.sentiment_2k='  # '' drops the task
    assert launch.main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / 'eval' / 'results.csv')))
    assert [(r['task'], r['variant'], r['seeds']) for r in rows] == [
        ('toy', 'pretrained', '1'), ('toy', 'scratch', '1')]
    runs = json.loads((tmp_path / 'eval' / 'runs.json').read_text())
    for row in rows:  # the table is the mean of the per-seed results.json files
        seeds = [r['accuracy'] for r in runs if r['variant'] == row['variant']]
        assert float(row['accuracy_mean']) == pytest.approx(np.mean(seeds))
        result = json.loads((tmp_path / 'eval' / 'toy' / row['variant'] / 'seed_1' /
                             'results.json').read_text())
        assert result['validation']['accuracy'] in seeds
    table = (tmp_path / 'eval' / 'results.md').read_text()
    assert '| toy | pretrained | 1 |' in table and ' ± ' in table
    capsys.readouterr()
    assert launch.main(argv) == 0  # everything done: read back, nothing retrained
    assert capsys.readouterr().out.count('this run is complete') == 2
    assert list(csv.DictReader(open(tmp_path / 'eval' / 'results.csv'))) == rows
