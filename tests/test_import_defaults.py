"""`launch.py import` writes continued-pretraining defaults for a real encoder (not the tiny
demo recipe) and prints commands that run as printed."""

import json
import shlex

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import launch  # noqa: E402
from convert import importer  # noqa: E402
from engine.checkpoint import read_params_numpy  # noqa: E402
from tests.helpers import ADJECTIVES, NOUNS, PLACES, VERBS  # noqa: E402


def _bare_bert(directory) -> None:
    """A small random transformers BertModel (no MLM head, as sentence encoders ship) with a
    WordPiece vocab.txt in BERT's layout."""
    vocab = ['[PAD]', '[unused0]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', '.',
             *ADJECTIVES, *NOUNS, *VERBS, *PLACES, *'abcdefghijklmnopqrstuvwxyz',
             *(f'##{c}' for c in 'abcdefghijklmnopqrstuvwxyz')]
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(str(directory))
    (directory / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    (directory / 'tokenizer_config.json').write_text(json.dumps({'do_lower_case': True}))


@pytest.fixture(scope='module')
def imported(tmp_path_factory) -> dict:
    import contextlib
    import io
    root = tmp_path_factory.mktemp('import_defaults')
    _bare_bert(root / 'hf')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert launch.main(['import', '--hf-dir', str(root / 'hf'), '--workdir',
                            str(root / 'w')]) == 0
    return {'root': root, 'work': root / 'w', 'stdout': out.getvalue()}


def test_config_is_continued_pretraining_not_the_tiny_recipe(imported):
    cfg = json.loads((imported['work'] / 'config.json').read_text())
    assert cfg['optimizer']['learning_rate'] == importer.CONTINUE_LEARNING_RATE == 1e-4
    assert cfg['optimizer']['warmup_steps'] == importer.CONTINUE_WARMUP_STEPS == 100
    assert cfg['num_train_steps'] == importer.CONTINUE_STEPS == 1000
    assert cfg['data']['train_files'] == ''  # no demo corpus: the user names theirs
    assert cfg['data']['tokenizer_type'] == 'wordpiece'  # the imported tokenizer
    assert cfg['model']['hidden_size'] == 32 and cfg['model']['dropout_rate'] == 0.1
    assert cfg['seq_len'] == 64  # capped by the imported position table


def _printed(stdout: str, command: str) -> list[str]:
    start = f'python launch.py {command} '
    line = next(x for x in stdout.splitlines() if x.strip().startswith(start))
    return shlex.split(line)[2:]


def _run(args: list[str]) -> int:
    return launch.main([str(a) for a in args])


@pytest.mark.slow
def test_printed_pretrain_command_runs_from_the_import(imported, corpus, capsys):
    work = imported['work']
    args = _printed(imported['stdout'], 'pretrain')
    assert f'--config.init_from={work}' in args and args[args.index('--workdir') + 1] != str(work)
    # As printed, without a corpus: one error line naming the key, nothing trained.
    assert _run(args) == 2
    assert 'error: data.train_files' in capsys.readouterr().err
    args = [a.replace(importer.TEXT_PLACEHOLDER, corpus) for a in args]
    small = ['--config.num_train_steps=2', '--config.optimizer.warmup_steps=1',
             '--config.batch_size=8', '--config.seq_len=32', '--config.eval_max_batches=1']
    assert _run(args + small) == 0
    cpt = args[args.index('--workdir') + 1]
    record = json.loads((work.parent / cpt.rsplit('/', 1)[-1] / 'config.json').read_text())
    assert record['optimizer']['learning_rate'] == 1e-4  # the imported defaults were used
    before = read_params_numpy(str(work / 'checkpoints'))
    after = read_params_numpy(f'{cpt}/checkpoints', 2)
    layer = next(k for k in before if 'layer_0' in k and k.endswith('kernel'))
    assert not np.array_equal(before[layer], after[layer])  # it trained from the import


def test_printed_finetune_command_uses_the_import_and_the_auto_defaults(imported):
    args = _printed(imported['stdout'], 'finetune')
    assert args[args.index('--config') + 1] == 'configs/finetune.py:custom'  # auto rate/epochs
    assert f'--config.init_from={imported["work"]}' in args
    assert not any(a.startswith(('--config.learning_rate', '--config.num_epochs')) for a in args)
