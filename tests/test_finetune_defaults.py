"""Fine-tuning defaults that adapt: learning_rate=0 by model width, num_epochs=0 by data size."""

import pytest

from configs.finetune import get_config as finetune_config
from configs.pretrain import get_config as pretrain_config
from engine.rundir import RunDir
from finetune import setup
from tests.test_finetune_e2e import task_files  # noqa: F401  (a fixture)


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
    RunDir(tmp_path).write_config(pretrain_config('base').to_dict())  # H768
    cfg = finetune_config('custom')
    cfg.init_from = str(tmp_path)
    assert setup.resolved_learning_rate(cfg) == 2e-5
    assert cfg.learning_rate == 0.0  # the config itself is left as given


def test_auto_from_scratch_uses_model_section_and_explicit_rate_is_kept():
    cfg = finetune_config('custom')
    cfg.init_from = 'none'
    cfg.model.hidden_size = 256
    assert setup.resolved_learning_rate(cfg) == 1e-4
    cfg.learning_rate = 7e-4
    assert setup.resolved_learning_rate(cfg) == 7e-4


@pytest.mark.parametrize('examples, batch, epochs', [
    (4696, 32, 11),     # TREC's train split: 147 steps an epoch
    (3609, 32, 14),     # SMS spam's: 113
    (100, 32, 375),     # 4 steps an epoch
    (48000, 32, 3),     # 1,500 steps an epoch: BERT's 3
    (1_000_000, 32, 3),
    (4696, 8, 3),       # smaller batches: more steps an epoch
])
def test_auto_epochs_by_data_size(examples, batch, epochs):
    assert setup.epochs_for_size(examples, batch) == epochs
    per_epoch = -(-examples // batch)
    assert epochs * per_epoch >= setup.AUTO_MIN_STEPS  # enough steps ...
    assert (epochs == setup.AUTO_MIN_EPOCHS  # ... the fewest
            or (epochs - 1) * per_epoch < setup.AUTO_MIN_STEPS)


def test_custom_defaults_to_auto_epochs_and_validate_resolves_it(task_files):  # noqa: F811
    from engine.errors import ConfigError
    from finetune import train
    assert finetune_config('sentiment').num_epochs == 1  # the demo keeps its epoch
    cfg = finetune_config('custom')
    assert cfg.num_epochs == 0
    cfg.init_from, cfg.batch_size = 'none', 8
    for split in ('train', 'validation', 'test'):
        cfg.data[f'{split}_file'] = task_files[split]
    resolved, _, task = train.validate(cfg)  # config.json is written from `resolved`
    n = len(task['train'].labels)
    assert resolved.num_epochs == setup.epochs_for_size(n, 8) > 3
    assert resolved.num_epochs * -(-n // 8) >= setup.AUTO_MIN_STEPS
    assert cfg.num_epochs == 0  # the caller's config is left as given
    cfg.num_epochs = 2  # an explicit value is kept
    assert train.validate(cfg)[0].num_epochs == 2
    cfg.num_epochs = -1
    with pytest.raises(ConfigError, match='num_epochs: must be >= 1, or 0 for auto'):
        train.validate(cfg)


@pytest.mark.parametrize('hidden, min_steps', [(64, 1500), (128, 1500), (256, 1500),
                                               (384, 400), (768, 400), (1024, 400)])
def test_step_minimum_by_width(hidden, min_steps):
    assert setup.min_steps_for_width(hidden) == min_steps


@pytest.mark.parametrize('examples, epochs', [
    (2000, 7),      # MiniLM on 2,000 TREC rows: 63 steps an epoch, 441 steps (not 24 epochs)
    (4696, 3),      # TREC's train split: 147 steps an epoch, BERT's 3
    (500, 25),      # 16 steps an epoch
    (100, 100),     # 4 steps an epoch
])
def test_auto_epochs_of_a_wide_encoder(examples, epochs):
    assert setup.epochs_for_size(examples, 32, setup.AUTO_MIN_STEPS_WIDE) == epochs


@pytest.mark.parametrize('size, epochs', [('tiny', 24), ('mini', 24), ('small', 7),
                                          ('base', 7)])
def test_resolve_epochs_reads_the_pretrained_width(tmp_path, size, epochs):
    RunDir(tmp_path).write_config(pretrain_config(size).to_dict())  # H128, H256, H512, H768
    cfg = finetune_config('custom')
    cfg.init_from = str(tmp_path)
    assert setup.resolved_num_epochs(cfg, 2000) == epochs  # 63 steps an epoch
    cfg.num_epochs = 5  # an explicit value is kept
    assert setup.resolved_num_epochs(cfg, 2000) == 5


def test_from_scratch_the_model_section_sets_the_minimum():
    cfg = finetune_config('custom')
    cfg.init_from, cfg.model.hidden_size = 'none', 384
    assert setup.resolved_num_epochs(cfg, 2000) == 7
