"""Export of a modern-recipe MLM run to transformers' ModernBertForMaskedLM: logits parity
(export's own verification, max |diff| <= 1e-4) and one-line refusals."""

import json
import re

import pytest

import launch
from tests.helpers import tiny_args

pytest.importorskip('torch')
pytest.importorskip('transformers')

MODERN = ('--config.model.position_embedding=rope', '--config.model.mlp=geglu',
          '--config.model.use_bias=False', '--config.model.pre_layer_norm=True',
          '--config.model.final_norm=True', '--config.model.first_attention_norm=False',
          '--config.model.local_attention_window=4', '--config.model.global_attention_every=2')


@pytest.mark.slow
@pytest.mark.parametrize('extra', [(), ('--config.model.mlp=swiglu', '--config.model.use_bias=True',
                                        '--config.model.local_attention_window=0')])
def test_a_modern_run_exports_to_modernbert_with_logit_parity(tmp_path, corpus, capsys, extra):
    pre = tmp_path / 'pre'
    assert launch.main(['pretrain', '--workdir', str(pre), *tiny_args(corpus, 3),
                        *MODERN, *extra]) == 0
    capsys.readouterr()
    assert launch.main(['export', '--workdir', str(pre), '--output', str(tmp_path / 'hf')]) == 0
    out = capsys.readouterr().out
    diff = float(re.search(r'max \|logit diff\|: (\S+)', out).group(1))
    assert diff <= 1e-4, out
    config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert config['model_type'] == 'modernbert'
    assert config['architectures'] == ['ModernBertForMaskedLM']


@pytest.mark.slow
@pytest.mark.parametrize('options, needs', [
    (('--config.model.mlp=geglu',), 'model.position_embedding=rope'),
    ((*MODERN[:5],), 'model.first_attention_norm=False'),
])
def test_runs_without_a_counterpart_are_refused_in_one_line(tmp_path, corpus, capsys, options,
                                                            needs):
    pre = tmp_path / 'pre'
    assert launch.main(['pretrain', '--workdir', str(pre), *tiny_args(corpus, 2),
                        *options]) == 0
    capsys.readouterr()
    assert launch.main(['export', '--workdir', str(pre), '--output',
                        str(tmp_path / 'hf')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'no transformers BERT counterpart' in err[0], err
    assert f'ModernBERT export needs {needs}' in err[0] or needs in err[0], err
    assert not (tmp_path / 'hf').exists()


def test_the_modern_recipe_config_exports_to_modernbert(tmp_path, corpus, capsys):
    from configs.pretrain import get_config
    cfg = get_config('tiny,recipe=modern')
    assert (cfg.model.position_embedding, cfg.model.mlp, cfg.masking.mask_rate,
            cfg.optimizer.schedule, cfg.model.intermediate_size) == ('rope', 'geglu', 0.3,
                                                                     'wsd', 320)
    with pytest.raises(ValueError, match="unknown recipe 'retro'"):
        get_config('tiny,recipe=retro')
    args = tiny_args(corpus, 3)
    args[1] = args[1] + ',recipe=modern'  # configs/pretrain.py:tiny,recipe=modern
    pre = tmp_path / 'pre'
    assert launch.main(['pretrain', '--workdir', str(pre), *args,
                        '--config.model.local_attention_window=8']) == 0
    capsys.readouterr()
    assert launch.main(['export', '--workdir', str(pre), '--output', str(tmp_path / 'hf')]) == 0
    assert 'max |logit diff|' in capsys.readouterr().out
