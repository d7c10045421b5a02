"""One optimizer section shape for both stages: read once at the entry into OptimizerConfig.

Fine-tuning keeps its top-level optimizer keys; its `optimizer` section holds the same
settings (one value each), so `--config.optimizer.KEY` and `--config.KEY` are one setting.
"""

import json

import ml_collections
import pytest

from configs.finetune import OPTIMIZER_KEYS
from configs.finetune import get_config as finetune_config
from configs.pretrain import get_config as pretrain_config
from engine import resume_check
from engine.config_cli import apply_overrides, config_from_json, config_to_json
from engine.errors import ConfigError
from engine.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from engine.rundir import RunDir
from finetune import setup
from pretrain import sections


def test_section_entry_and_top_level_key_are_one_setting():
    cfg = finetune_config('custom')
    apply_overrides(cfg, ['optimizer.learning_rate=1e-4', 'weight_decay=0.1'])
    assert cfg.learning_rate == 1e-4 and cfg.optimizer.weight_decay == 0.1
    typed = setup.optimizer_config(cfg)
    assert (typed.learning_rate, typed.weight_decay) == (1e-4, 0.1)
    saved = json.loads(config_to_json(cfg))  # config.json writes both, equal
    assert all(saved['optimizer'][k] == saved[k] for k in OPTIMIZER_KEYS)


def test_a_config_read_back_from_json_keeps_them_one_setting():
    cfg = config_from_json(config_to_json(finetune_config('custom')))
    apply_overrides(cfg, ['learning_rate=5e-5'])
    assert cfg.optimizer.learning_rate == 5e-5
    assert setup.optimizer_config(cfg).learning_rate == 5e-5


def test_disagreeing_copies_are_one_config_error():
    saved = json.loads(config_to_json(finetune_config('custom')))
    saved['optimizer']['learning_rate'] = 1e-3  # hand-edited: the two copies disagree
    cfg = ml_collections.ConfigDict(saved)
    with pytest.raises(ConfigError, match='optimizer.learning_rate: 0.001, but learning_rate'):
        setup.optimizer_config(cfg)


def test_a_config_without_the_section_reads_its_top_level_keys():
    cfg = finetune_config('custom')
    del cfg['optimizer']
    cfg.learning_rate = 7e-5
    assert setup.optimizer_config(cfg).learning_rate == 7e-5


def test_both_stages_build_the_same_typed_config():
    pre = sections.optimizer_config(pretrain_config('tiny'))
    fine = setup.optimizer_config(finetune_config('sentiment'))
    assert isinstance(pre, OptimizerConfig) and isinstance(fine, OptimizerConfig)
    assert fine.learning_rate == 3e-4 and pre.learning_rate == 2e-3


def test_below_the_entry_a_config_section_is_refused():
    section = pretrain_config('tiny').optimizer
    with pytest.raises(TypeError, match='expected an OptimizerConfig, got ConfigDict'):
        make_optimizer(section, 10)
    with pytest.raises(TypeError, match='expected an OptimizerConfig'):
        learning_rate_schedule(section, 10)


def test_a_workdir_started_before_the_section_still_resumes(tmp_path):
    """Its config.json has only the top-level keys: not a change a resume refuses."""
    cfg = finetune_config('custom')
    old = json.loads(config_to_json(cfg))
    del old['optimizer']
    (tmp_path / 'config.json').write_text(json.dumps(old))
    (RunDir(tmp_path).checkpoints / '5').mkdir(parents=True)
    assert resume_check.check_finetune(cfg.to_dict(), tmp_path) == old
    cfg.optimizer.learning_rate = 1e-3  # but the setting itself still may not change
    with pytest.raises(ConfigError, match='^learning_rate: the run in'):
        resume_check.check_finetune(cfg.to_dict(), tmp_path)
