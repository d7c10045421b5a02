"""Every in-process test sees 8 fake CPU devices, so sharding is exercised for real.

Tests that need a different device count (1-device resume) run `launch.py` in a subprocess.
"""

import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One XLA compilation cache for this test session, shared with the launch.py subprocesses
# (they inherit the environment): many end-to-end tests compile the same tiny programs.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _XLA_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='bertjax-xla-')


import pytest  # noqa: E402  (after the environment is set)


def pytest_sessionfinish(session, exitstatus) -> None:
    if '_XLA_CACHE' in globals():  # only the cache this session made
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def corpus(tmp_path_factory) -> str:
    """A glob of two small generated text files (see tests/helpers.py)."""
    from tests.helpers import write_corpus
    return write_corpus(tmp_path_factory.mktemp('corpus'))


@pytest.fixture(scope='session')
def pretrained_run(tmp_path_factory, corpus) -> str:
    """A tiny pretraining workdir (10 steps, 1 layer, BPE tokenizer), shared read-only by the
    fine-tuning tests that only need *a* pretrained encoder."""
    import launch
    from tests.helpers import tiny_args
    workdir = tmp_path_factory.mktemp('pretrained') / 'run'
    assert launch.main(['pretrain', '--workdir', str(workdir), *tiny_args(corpus, 10)]) == 0
    return str(workdir)
