"""The CLI explains itself: every subcommand's --help names its docs page (and, with a
config, the family and main keys with defaults); --print-config prints and exits."""

import json
import pathlib

import pytest

import launch
from engine.config_cli import apply_overrides, config_from_json, config_to_json, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('name', sorted(launch.COMMANDS))
def test_help_names_its_docs_page_and_main_keys(name, capsys):
    command = launch.COMMANDS[name]
    with pytest.raises(SystemExit) as done:
        launch.main([name, '--help'])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert command.docs and (ROOT / command.docs).is_file()
    assert f'docs: {command.docs}' in out
    assert '--print-config' in out
    if command.default_config:
        config = load_config(command.default_config)
        assert f'config family: {command.default_config.partition(":")[0]}' in out
        for key in command.main_keys:  # each main key exists, shown with its default
            value = config
            for part in key.split('.'):
                value = value[part]
            assert f'--config.{key}={value!r}' in out


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        launch.main(['--help'])
    out = capsys.readouterr().out
    assert all(name in out for name in launch.COMMANDS)


@pytest.mark.parametrize('name', sorted(n for n, c in launch.COMMANDS.items() if c.default_config))
def test_print_config_prints_the_config_with_overrides_and_exits(name, tmp_path, capsys):
    command = launch.COMMANDS[name]
    override = '--config.init_from=runs/somewhere'
    workdir = tmp_path / 'never'
    assert launch.main([name, '--print-config', '--workdir', str(workdir), override]) == 0
    printed = config_from_json(capsys.readouterr().out)
    expected = load_config(command.default_config)
    apply_overrides(expected, [override[len('--config.'):]])
    assert config_to_json(printed) == config_to_json(expected)
    assert not workdir.exists()  # nothing written


def test_print_config_without_a_config_prints_the_arguments(capsys):
    assert launch.main(['predict', '--print-config', '--input', 'x.txt']) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {'command': 'predict', 'input': 'x.txt', 'output': '', 'workdir': None}


def test_print_config_needs_no_workdir_but_a_run_still_does(capsys):
    assert launch.main(['finetune', '--print-config']) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        launch.main(['finetune'])
    assert done.value.code == 2
