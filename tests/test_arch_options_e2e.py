"""The architecture options end to end through `launch.py`: a tiny pretraining run with all
of them on, its export refused in one line, fine-tuning from it, and a fine-tune with
mean pooling."""

import json
import math

import numpy as np
import pytest

import launch
from tests.helpers import REPO, read_metrics, tiny_args, write_toy_task

OPTIONS = ['--config.model.position_embedding=rope', '--config.model.rope_theta=1000.0',
           '--config.model.mlp=geglu', '--config.model.use_bias=False',
           '--config.model.final_norm=True', '--config.model.pre_layer_norm=True',
           '--config.model.local_attention_window=8', '--config.model.global_attention_every=2',
           '--config.model.num_layers=2']


def _finetune_args(task: str, *extra: str) -> list[str]:
    return ['--config', f'{REPO}/configs/finetune.py:custom', f'--config.data.train_file={task}',
            '--config.num_epochs=2', '--config.batch_size=16', '--config.seq_len=16',
            '--config.learning_rate=2e-3', '--config.log_every_steps=5',
            '--config.model.pooling=cls', *extra]


@pytest.mark.slow
def test_all_options_pretrain_export_refusal_and_finetune(tmp_path, corpus, capsys):
    pre = tmp_path / 'pre'
    assert launch.main(['pretrain', '--workdir', str(pre), *tiny_args(corpus, 8, *OPTIONS)]) == 0
    model = json.loads((pre / 'config.json').read_text())['model']
    assert (model['position_embedding'], model['mlp'], model['use_bias']) == ('rope', 'geglu',
                                                                              False)
    assert model['num_layers'] == 2  # layer 0 global, layer 1 local
    losses = [r['loss'] for r in read_metrics(pre) if 'loss' in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses

    capsys.readouterr()
    assert launch.main(['export', '--workdir', str(pre), '--output', str(tmp_path / 'hf')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.position_embedding='rope'" in err[0], err
    assert 'no transformers BERT counterpart' in err[0]
    assert not (tmp_path / 'hf').exists()

    # Fine-tuning restores the rope/geglu/bias-free encoder from the checkpoint.
    task = write_toy_task(tmp_path, n=96)
    ft = tmp_path / 'ft'
    assert launch.main(['finetune', '--workdir', str(ft),
                        *_finetune_args(task, f'--config.init_from={pre}')]) == 0
    assert json.loads((ft / 'model.json').read_text())['mlp'] == 'geglu'
    assert all(math.isfinite(r['loss']) for r in read_metrics(ft) if 'loss' in r)


@pytest.mark.slow
def test_finetune_with_mean_pooling(tmp_path, capsys):
    task = write_toy_task(tmp_path, n=96)
    ft = tmp_path / 'ft'
    assert launch.main(['finetune', '--workdir', str(ft), *_finetune_args(
        task, '--config.init_from=none', '--config.model.pooling=mean',
        '--config.model.num_layers=1', '--config.model.hidden_size=32',
        '--config.model.intermediate_size=64', '--config.model.vocab_size=128')]) == 0
    assert json.loads((ft / 'model.json').read_text())['pooling'] == 'mean'
    losses = [r['loss'] for r in read_metrics(ft) if 'loss' in r]
    assert losses and all(np.isfinite(losses)), losses
    results = json.loads((ft / 'results.json').read_text())
    assert 0.0 <= results['validation']['accuracy'] <= 1.0
    # BertForSequenceClassification reads [CLS]: the export says how to get an exportable run.
    assert launch.main(['export', '--workdir', str(ft), '--output', str(tmp_path / 'hf')]) == 2
    assert '--config.model.pooling=cls to export' in capsys.readouterr().err
