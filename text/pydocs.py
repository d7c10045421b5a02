"""The 'pydocs' corpus: docstrings of the Python standard library, a second demo domain.

Continual pretraining needs new text from another domain than the demo tweets, shipped with
the machine. Python's own standard library has it: the docstrings of its modules, classes
and functions (technical English, code names, reStructuredText markup). They are read with
`ast` from the .py files under sysconfig's 'stdlib' path, so no module is imported (and
nothing runs). Left out: site-packages and test packages (directories named 'test',
'tests' or 'idle_test'). Each docstring (cleaned by ast.get_docstring, its lines joined
by single spaces) is one document; repeats are dropped (first kept). The corpus depends
on the Python version (3.11.7 here: 734 files, 8,251 docstrings, 1.7M characters), so
the cache directory names it.

The documents are shuffled with np.random.default_rng(seed) and split 80/10/10 like the
tweets (text.splits.SPLIT_FRACTIONS); files live in CACHE/pydocs-py3.11-seed{seed}/
and are reused when present.
"""

from __future__ import annotations

import ast
import pathlib
import sys
import sysconfig

from engine.paths import default_cache_dir
from text.splits import SPLITS, seeded_split, write_split

NAME = 'pydocs'
_SKIPPED_DIRS = frozenset({'site-packages', 'test', 'tests', 'idle_test'})
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The standard library's .py files, sorted, without site-packages and test packages."""
    root = pathlib.Path(root or sysconfig.get_paths()['stdlib'])
    return [p for p in sorted(root.rglob('*.py'))
            if not _SKIPPED_DIRS & set(p.relative_to(root).parts[:-1])]


def docstrings(path: pathlib.Path) -> list[str]:
    """A file's docstrings in source order (module first), each on one line."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # e.g. a lib2to3 test fixture in Python 2 syntax
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENTED):
            text = ast.get_docstring(node, clean=True)
            if text and text.strip():
                out.append(' '.join(text.split()))
    return out


def read_documents(root: pathlib.Path | None = None) -> list[str]:
    """All docstrings of the standard library, repeats dropped (first kept)."""
    seen: set[str] = set()
    docs = []
    for path in stdlib_files(root):
        for text in docstrings(path):
            if text not in seen:
                seen.add(text)
                docs.append(text)
    if not docs:
        raise ValueError(f'{NAME}: no docstring found under {root or "the stdlib"}')
    return docs


def split(cache_dir: str | None = None, seed: int = 0) -> dict[str, dict[str, pathlib.Path]]:
    """The docstrings split 80/10/10 into {split: {'jsonl': path, 'txt': path}} (cached)."""
    version = f'py{sys.version_info.major}.{sys.version_info.minor}'
    root = pathlib.Path(cache_dir or default_cache_dir()) / f'{NAME}-{version}-seed{seed}'
    paths = {s: {'jsonl': root / f'{s}.jsonl', 'txt': root / f'{s}.txt'} for s in SPLITS}
    if all(p.is_file() for d in paths.values() for p in d.values()):
        return paths
    # No labels: (text, '') rows like the tweets'.
    parts = seeded_split([(doc, '') for doc in read_documents()], seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        write_split(part, root / name)
    return paths
