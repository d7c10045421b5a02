"""Shared by the end-to-end tests: a tiny generated corpus, tiny configs, subprocess runs."""

import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
ADJECTIVES = 'red blue green big small old young quiet'.split()
NOUNS = 'cat dog bird horse fish mouse tree house river garden'.split()
VERBS = 'sat ran flew slept jumped walked'.split()
PLACES = 'on under over near behind'.split()
# These corpora are tiny: without this, a run would continue (and first build) the general
# encoder (data.small_corpus_mb, tests/test_small_corpus.py tests that rule).
NO_SMALL_CORPUS = ('--config.data.small_corpus_mb=0',)


def sentence(rng: np.random.Generator) -> tuple[str, str]:
    """A templated sentence and its adjective."""
    adjective = rng.choice(ADJECTIVES)
    return (f'the {adjective} {rng.choice(NOUNS)} {rng.choice(VERBS)} {rng.choice(PLACES)} '
            f'the {rng.choice(NOUNS)} .'), adjective


def write_toy_task(root: pathlib.Path, n: int = 200, seed: int = 3) -> str:
    """A CSV classification task of `n` templated sentences whose label ('warm'/'cool')
    depends on the adjective alone. Returns its path."""
    rng = np.random.default_rng(seed)
    lines = ['text,label']
    for _ in range(n):
        text, adjective = sentence(rng)
        lines.append(f"{text},{'warm' if adjective in {'red', 'big', 'old', 'quiet'} else 'cool'}")
    (root / 'task.csv').write_text('\n'.join(lines) + '\n')
    return str(root / 'task.csv')


def write_corpus(root: pathlib.Path) -> str:
    """Two text files of templated sentences (one document per line): structure that even
    a 1-layer model learns in a few dozen steps. Returns their glob."""
    rng = np.random.default_rng(0)
    for name in ('a', 'b'):
        lines = [sentence(rng)[0] for _ in range(600)]
        (root / f'{name}.txt').write_text('\n'.join(lines) + '\n')
    return str(root / '*.txt')


def tiny_args(corpus: str, steps: int, *extra: str, dropout: float = 0.0) -> list[str]:
    return ['--config', f'{REPO}/configs/pretrain.py:tiny', f'--config.num_train_steps={steps}',
            '--config.model.num_layers=1', '--config.model.hidden_size=32',
            '--config.model.intermediate_size=64', '--config.model.vocab_size=128',
            f'--config.model.dropout_rate={dropout}',
            f'--config.model.attention_dropout_rate={dropout}',
            '--config.seq_len=32', '--config.batch_size=16', '--config.log_every_steps=2',
            '--config.eval_every_steps=0', '--config.eval_max_batches=2',
            '--config.optimizer.warmup_steps=2', '--config.optimizer.learning_rate=3e-3',
            '--config.data.tokenizer_type=bpe',  # unigram keeps ~50 pieces on this corpus
            f'--config.data.train_files={corpus}', *NO_SMALL_CORPUS, *extra]


def read_metrics(workdir) -> list[dict]:
    """The records of a run's metrics.jsonl (a local workdir or gs://...)."""
    from etils import epath
    lines = (epath.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
    return [json.loads(line) for line in lines]


def env(devices: int) -> dict:
    """This environment with `devices` fake CPU devices."""
    out = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
    out['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    return out


def launch_command(*args: str) -> list[str]:
    """`python launch.py ARGS` as a user without the test extras runs it: tensorboardX
    imports torch whenever it is installed (2.4 s per process here), and no launch.py
    subprocess of the tests needs torch, so it is hidden from them."""
    no_torch = ("import os, runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                "sys.path[0] = os.path.dirname(sys.argv[0]); "  # as `python launch.py` sets it
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, '-c', no_torch, str(REPO / 'launch.py'), *args]


def launch(workdir, args, devices: int = 1, cwd=REPO,
           command: str = 'pretrain') -> subprocess.CompletedProcess:
    """Runs `launch.py COMMAND --workdir WORKDIR ARGS` in a subprocess."""
    cmd = launch_command(command, '--workdir', str(workdir), *args)
    return subprocess.run(cmd, cwd=cwd, env=env(devices), capture_output=True, text=True,
                          timeout=600)


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """Sentences of made-up words, for tokenizer and data tests."""
    rng = random.Random(seed)
    syllables = ['ka', 'lo', 'mi', 'ter', 'sun', 'ra', 'ven', 'do', 'pi', 'nor', 'gal', 'shu']
    words = [''.join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    return [' '.join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + '.'
            for _ in range(n)]


def small_tokenizer(directory: pathlib.Path):
    """A 150-piece BPE tokenizer trained on `make_sentences(300)`."""
    from text import tokenizer
    return tokenizer.train_tokenizer(make_sentences(300), str(directory / 'spm.model'), 150,
                                     'bpe')


def tensorboard_events(directory: pathlib.Path):
    """The Event protos of the event files under `directory`, in file order (TFRecord
    framing: 8-byte length, 4-byte crc, the Event proto, 4-byte crc)."""
    import struct

    from tensorboardX.proto import event_pb2
    for file in sorted(pathlib.Path(directory).rglob('events.out.tfevents.*')):
        data, pos = file.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack('<Q', data[pos:pos + 8])
            yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
