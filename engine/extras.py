"""Optional extras (pyproject.toml's [project.optional-dependencies]): a feature imports
what it needs through `require`, so a missing package is one line naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from engine.errors import ConfigError

# Module -> the extra that installs it.
EXTRAS = {
    'tensorflow_datasets': 'tfds',
    'gcsfs': 'gcs',
    'optuna': 'search',
    'matplotlib': 'plots',
    'wandb': 'wandb',
    'torch': 'hf',
    'transformers': 'hf',
    'libtpu': 'tpu-compile',
    'datasets': 'datasets',
    'pyarrow': 'formats',
    'zstandard': 'formats',
}


def install_hint(module: str) -> str:
    """How to install the extra that provides `module`."""
    extra = EXTRAS[module.split('.')[0]]
    return f"pip install -e '.[{extra}]' (from the repository; elsewhere 'bertjax[{extra}]')"


def require(module: str, feature: str) -> ModuleType:
    """`module` imported, or a ConfigError saying that `feature` needs its extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS[module.split('.')[0]]
        raise ConfigError(f'{feature} needs the optional extra [{extra}]: '
                          f'{install_hint(module)}') from None
