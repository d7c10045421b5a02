"""Search-space specs of `launch.py search`: plain strings, parsed without eval.

    loguniform(1e-5, 1e-3)              a float, uniform in log space (low > 0)
    uniform(0, 0.2)                     a float, uniform
    int(1, 5)                           an integer, low..high inclusive
    choice(16, 32)                      one of the listed values: numbers, True/False or
    choice('none', 'layers:1', 'encoder')   quoted strings

Each spec is keyed by a dotted key of configs/finetune.py (`learning_rate`,
`model.dropout_rate`, ...) and must fit that key's type: an integer key takes `int(...)`
or a choice of integers, a string key a choice of quoted strings, a boolean key a choice
of True/False; a float key takes any of them with numbers.
"""

import dataclasses
import math
import re
from typing import Any

import ml_collections

from engine.config_cli import flat_keys
from engine.errors import ConfigError

KINDS = ('loguniform', 'uniform', 'int', 'choice')
_SPEC = re.compile(r'\s*([A-Za-z_]+)\s*\((.*)\)\s*$', re.S)
# One argument (a quoted string or a bare word/number) and the comma (or end) after it.
_ARG = re.compile(r"""\s*('[^']*'|"[^"]*"|[^\s,'"][^,'"]*?)\s*(?:,|$)""")
_INT = re.compile(r'[+-]?\d+')


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config key: `kind` with its `args` (bounds, or the choices)."""
    key: str
    kind: str
    args: tuple

    def suggest(self, trial) -> Any:
        """Samples this parameter in an optuna trial (named by the config key)."""
        if self.kind == 'choice':
            return trial.suggest_categorical(self.key, list(self.args))
        if self.kind == 'int':
            return trial.suggest_int(self.key, *self.args)
        return trial.suggest_float(self.key, *self.args, log=self.kind == 'loguniform')


def _literal(token: str, what: str) -> Any:
    if token[0] in '\'"':
        return token[1:-1]
    if token in ('True', 'true', 'False', 'false'):
        return token.lower() == 'true'
    if _INT.fullmatch(token):
        return int(token)
    try:
        value = float(token)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f'{what}: {token!r} is not a finite number, True/False or a quoted '
                          'string')
    return value


def _arguments(text: str, what: str) -> tuple:
    values, pos = [], 0
    while pos < len(text) and text[pos:].strip():
        match = _ARG.match(text, pos)
        if not match:
            raise ConfigError(f'{what}: cannot parse the arguments {text!r}')
        values.append(_literal(match.group(1), what))
        pos = match.end()
    return tuple(values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_spec(key: str, spec: str) -> Param:
    """'loguniform(1e-5, 1e-3)' etc. -> Param; ConfigError naming `space.KEY` otherwise."""
    what = f'space.{key}'
    match = _SPEC.match(spec)
    if not match or match.group(1) not in KINDS:
        raise ConfigError(f'{what}: expected one of {", ".join(k + "(...)" for k in KINDS)}, '
                          f'got {spec!r}')
    kind, args = match.group(1), _arguments(match.group(2), what)
    if kind == 'choice':
        if not args or len(set(args)) != len(args):
            raise ConfigError(f'{what}: choice(...) needs one or more distinct values')
        return Param(key, kind, args)
    if len(args) != 2 or not all(_is_number(a) for a in args):
        raise ConfigError(f'{what}: {kind}(low, high) needs two numbers, got {spec!r}')
    low, high = args
    if kind == 'int' and not all(isinstance(a, int) for a in args):
        raise ConfigError(f'{what}: int(low, high) needs integer bounds, got {spec!r}')
    if high < low or (kind != 'int' and high == low):
        raise ConfigError(f'{what}: low must be below high, got {spec!r}')
    if kind == 'loguniform' and low <= 0:
        raise ConfigError(f'{what}: loguniform needs low > 0, got {spec!r}')
    return Param(key, kind, (low, high) if kind == 'int' else (float(low), float(high)))


def _check_type(param: Param, old: Any) -> None:
    """The values `param` can take fit the type of the config value it replaces."""
    values = param.args
    if isinstance(old, bool):
        fits = param.kind == 'choice' and all(isinstance(v, bool) for v in values)
    elif isinstance(old, int):
        fits = param.kind in ('int', 'choice') and all(
            isinstance(v, int) and not isinstance(v, bool) for v in values)
    elif isinstance(old, float):
        fits = all(_is_number(v) for v in values)
    elif isinstance(old, str):
        fits = param.kind == 'choice' and all(isinstance(v, str) for v in values)
    else:
        raise ConfigError(f'space.{param.key}: a {type(old).__name__} key cannot be searched')
    if not fits:
        raise ConfigError(f'space.{param.key}: {param.kind}{values} does not fit the '
                          f'{type(old).__name__} value {old!r} of {param.key}')


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split('.'):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f'space.{key}: not a key of the fine-tuning config '
                              f'(e.g. learning_rate, model.dropout_rate)')
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f'space.{key}: a section, not a key of the fine-tuning config')
    return node


def parse_space(space: ml_collections.ConfigDict,
                base: ml_collections.ConfigDict) -> list[Param]:
    """The `space` section -> Params, checked against the fine-tuning config `base`.
    An entry set to '' is dropped (so a command line can remove one)."""
    params = []
    for key in flat_keys(space):
        spec = _lookup(space, key)
        if not isinstance(spec, str):
            raise ConfigError(f'space.{key}: expected a spec string such as '
                              f"'uniform(0, 0.2)', got {spec!r}")
        if spec.strip():
            param = parse_spec(key, spec)
            _check_type(param, _lookup(base, key))
            params.append(param)
    if not params:
        raise ConfigError('space: no parameters to search')
    return params


def apply_params(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    """Sets sampled values (dotted keys) in place; ints become floats for float keys."""
    for key, value in values.items():
        *parents, leaf = key.split('.')
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = float(value) if isinstance(node[leaf], float) else value
