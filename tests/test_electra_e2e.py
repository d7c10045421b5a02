"""objective=electra end to end through `launch.py`: a tiny run (with span masking at 25 %,
evaluated at eval_mask_rate 0.15) that logs both losses, resumes exactly, exports its
discriminator as transformers' ElectraForPreTraining, and fine-tunes from its encoder."""

import json
import math
import shutil

import numpy as np
import pytest

import launch
from engine.checkpoint import read_params_numpy
from tests.helpers import REPO, read_metrics, tiny_args, write_toy_task

ELECTRA = ['--config.objective=electra', '--config.electra.generator_size=0.5',
           '--config.masking.mask_rate=0.25', '--config.masking.span_length=2',
           '--config.checkpoint_every_steps=4', '--config.eval_every_steps=4']


def _losses(workdir) -> list[tuple]:
    keys = ('step', 'loss', 'generator_loss', 'disc_loss', 'disc_accuracy', 'mlm_accuracy')
    return [tuple(r[k] for k in keys) for r in read_metrics(workdir) if 'loss' in r]


@pytest.mark.slow
def test_electra_run_resumes_exactly_exports_and_finetunes(tmp_path, corpus, capsys):
    pre = tmp_path / 'pre'
    assert launch.main(['pretrain', '--workdir', str(pre), *tiny_args(corpus, 8, *ELECTRA)]) == 0
    out = capsys.readouterr().out
    assert 'fresh start' in out
    records = read_metrics(pre)
    train = [r for r in records if 'loss' in r]
    assert [r['step'] for r in train] == [2, 4, 6, 8]
    for r in train:
        for key in ('loss', 'generator_loss', 'disc_loss', 'disc_accuracy', 'replaced_fraction'):
            assert math.isfinite(r[key]), (key, r)
        # loss = generator MLM loss + 50 x discriminator BCE (means over the interval).
        assert r['loss'] == pytest.approx(r['generator_loss'] + 50 * r['disc_loss'], rel=1e-4)
        assert 0 < r['replaced_fraction'] < 0.25
    evals = [r for r in records if 'eval_loss' in r]
    assert [r['step'] for r in evals] == [4, 8]
    for key in ('eval_loss', 'eval_mlm_accuracy', 'eval_disc_loss', 'eval_disc_accuracy'):
        assert all(math.isfinite(r[key]) for r in evals), key

    # Interrupted after step 4 (its later checkpoint gone), then resumed: the same run.
    resumed = tmp_path / 'resumed'
    shutil.copytree(pre, resumed)
    shutil.rmtree(resumed / 'checkpoints' / '8')
    assert launch.main(['pretrain', '--workdir', str(resumed),
                        *tiny_args(corpus, 8, *ELECTRA)]) == 0
    assert 'resuming from step 4' in capsys.readouterr().out
    assert _losses(resumed) == _losses(pre)
    final, again = (read_params_numpy(str(w / 'checkpoints'), 8) for w in (pre, resumed))
    assert final.keys() == again.keys() and any(k.startswith('generator/') for k in final)
    for key in final:
        np.testing.assert_array_equal(final[key], again[key], err_msg=key)

    # The discriminator exports (verified against transformers when it is installed).
    assert launch.main(['export', '--workdir', str(pre), '--output', str(tmp_path / 'hf')]) == 0
    out = capsys.readouterr().out
    assert 'exported ElectraForPreTraining (step 8)' in out
    assert 'verify: skipped' in out or 'tokenizer: 20/20' in out
    assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['model_type'] == 'electra'

    # A linear probe from it: the frozen encoder is exactly the discriminator's.
    task = write_toy_task(tmp_path, n=96)
    ft = tmp_path / 'ft'
    assert launch.main(['finetune', '--workdir', str(ft), '--config',
                        f'{REPO}/configs/finetune.py:custom', f'--config.data.train_file={task}',
                        f'--config.init_from={pre}', '--config.freeze=encoder',
                        '--config.num_epochs=1', '--config.batch_size=16',
                        '--config.seq_len=16', '--config.log_every_steps=5',
                        '--config.model.pooling=cls']) == 0
    assert all(math.isfinite(r['loss']) for r in read_metrics(ft) if 'loss' in r)
    tuned = read_params_numpy(str(ft / 'checkpoints'))
    encoder = [k for k in final if k.startswith(('bert/embeddings/', 'bert/encoder/'))]
    assert encoder
    for key in encoder:
        np.testing.assert_array_equal(tuned[key], final[key], err_msg=key)
