"""Fine-tuning defaults that adapt to the model: learning_rate=0 ('auto') by model width."""

import pytest

from configs.finetune import get_config as finetune_config
from configs.pretrain import get_config as pretrain_config
from engine.rundir import RunDir
from finetune import setup


@pytest.mark.parametrize('hidden, rate', [(64, 3e-4), (128, 3e-4), (256, 1e-4), (512, 5e-5),
                                          (768, 2e-5), (1024, 2e-5)])
def test_rate_by_width(hidden, rate):
    assert setup.learning_rate_for_width(hidden) == rate


def test_custom_default_is_auto_and_sentiment_keeps_its_rate():
    assert finetune_config('custom').learning_rate == 0.0
    assert finetune_config('sentiment').learning_rate == 3e-4


def test_pooling_default_mean_for_your_data_cls_for_the_demo():
    assert finetune_config('custom').model.pooling == 'mean'  # the benchmark's winner
    assert finetune_config('sentiment').model.pooling == 'cls'  # exportable demo


def test_auto_reads_the_pretrained_width(tmp_path):
    RunDir(tmp_path).write_config(pretrain_config('base'))  # H768
    cfg = finetune_config('custom')
    cfg.init_from = str(tmp_path)
    setup.resolve_learning_rate(cfg)
    assert cfg.learning_rate == 2e-5


def test_auto_from_scratch_uses_model_section_and_explicit_rate_is_kept():
    cfg = finetune_config('custom')
    cfg.init_from = 'none'
    cfg.model.hidden_size = 256
    setup.resolve_learning_rate(cfg)
    assert cfg.learning_rate == 1e-4
    cfg.learning_rate = 7e-4
    setup.resolve_learning_rate(cfg)
    assert cfg.learning_rate == 7e-4
