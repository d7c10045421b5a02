"""Command-line configs in ml_collections style: `--config FILE:ARG --config.a.b=value`.

Written here rather than through absl flags so that every mistake (a misspelt key, a
value of the wrong type, a missing file) becomes one line naming the key, not a traceback.
"""

import ast
import difflib
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from engine.errors import ConfigError
from engine.rundir import RunDir, config_text, config_values

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]  # configs/ is under it



def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]` by calling the module's `get_config(arg)`, or a run's
    saved `config.json` (e.g. to continue pretraining an imported checkpoint)."""
    path, _, arg = spec.partition(':')
    file = pathlib.Path(path)
    if not file.is_file() and not file.is_absolute() and (PROJECT_ROOT / file).is_file():
        file = PROJECT_ROOT / file  # the shipped configs/, from any working directory
    if not file.is_file():
        raise ConfigError(f'--config: no such file {path!r}')
    if file.suffix == '.json':
        try:
            return config_from_json(file.read_text())
        except ValueError as e:
            raise ConfigError(f'--config: {path}: {e}') from None
    module_spec = importlib.util.spec_from_file_location(f'_config_{file.stem}', file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # the config file's own message names the problem
        raise ConfigError(str(e)) from None
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
    """All leaf keys as dotted paths, e.g. ['seed', 'model.num_layers', ...]."""
    keys = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, f'{prefix}{key}.')
        else:
            keys.append(f'{prefix}{key}')
    return keys


def _unknown_key(key: str, config: ml_collections.ConfigDict) -> ConfigError:
    close = difflib.get_close_matches(key, flat_keys(config), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    return ConfigError(f"--config.{key}: unknown config key{hint}")


def _parse_value(key: str, old: Any, text: str) -> Any:
    """Parses `text` into the type of the current value of `key`."""
    try:
        if isinstance(old, bool):
            if text.lower() not in ('true', 'false', '1', '0'):
                raise ValueError
            return text.lower() in ('true', '1')
        if isinstance(old, int | float):
            value = ast.literal_eval(text)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError
            return type(old)(value) if isinstance(old, float) or value == int(value) else value
        if isinstance(old, tuple | list):
            value = ast.literal_eval(text)
            if isinstance(value, int):  # '--config.mesh.shape=8' means (8,)
                value = (value,)
            if not isinstance(value, tuple | list):
                raise ValueError
            return tuple(value)
        if isinstance(old, str) or old is None:
            return text
    except (ValueError, SyntaxError):
        pass
    raise ConfigError(f'--config.{key}: cannot parse {text!r} as {type(old).__name__}')


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `key=value` overrides (dotted keys) in place, type-checked. Only the sections
    a config lists in its `open_sections` accept new (string) keys."""
    for item in overrides:
        key, sep, text = item.partition('=')
        if not sep:
            raise ConfigError(f'--config.{key}: expected --config.{key}=VALUE')
        *parents, leaf = key.split('.')
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise _unknown_key(key, config)
            node = node[part]
        if leaf not in node and '.'.join(parents) in config.get('open_sections', ()):
            node[leaf] = ''  # a new entry of a name -> 'text' section (see configs/suite.py)
        if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
            raise _unknown_key(key, config)
        with node.ignore_type():
            node[leaf] = _parse_value(key, node[leaf], text)


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Splits argv into (config spec, ['key=value' overrides], remaining args)."""
    spec, overrides, rest = None, [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == '--config' or arg.startswith('--config='):
            spec = arg.partition('=')[2] or (args.pop(0) if args else '')
        elif arg.startswith('--config.'):
            body = arg[len('--config.'):]
            if '=' not in body and args:  # '--config.seed 3'
                body = f'{body}={args.pop(0)}'
            overrides.append(body)
        else:
            rest.append(arg)
    return spec, overrides, rest


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as stable, human-readable JSON (config.json's text)."""
    return config_text(config.to_dict())


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `config_to_json` (lists become tuples, as the config files write them)."""
    return config_from_values(config_values(text))


def config_from_values(values: dict[str, Any]) -> ml_collections.ConfigDict:
    """A ConfigDict of a saved config's values (RunDir.read_config): fine-tuning's
    `optimizer` keys linked to their top-level aliases again."""
    config = ml_collections.ConfigDict(values)
    if isinstance(config.get('optimizer'), ml_collections.ConfigDict):  # fine-tuning's
        same = [k for k, v in config.optimizer.items() if k in config and config[k] == v]
        link_aliases(config, 'optimizer', same)
    return config


def read_run_config(workdir: Any) -> ml_collections.ConfigDict:
    """A workdir's config.json as a ConfigDict, for the code that still reads one."""
    return config_from_values(RunDir(workdir).read_config())


def link_aliases(config: ml_collections.ConfigDict, section: str, keys: Sequence[str]) -> None:
    """Makes `config[section][key]` the same setting as the top-level `config[key]` for each
    key (one shared value: setting either sets both; config.json writes both)."""
    if section not in config:
        config[section] = ml_collections.ConfigDict()
    for key in keys:
        config[section][key] = config.get_ref(key)
