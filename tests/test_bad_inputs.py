"""User errors of `launch.py predict` and `launch.py import`: exit code 2, one `error: ` line
on stderr, no traceback, and nothing written."""

import io
import json
import pathlib
import shutil

import pytest

import launch
from finetune import predict
from tests.helpers import REPO, write_toy_task

TEXTS = 'the red dog ran near the house .\n\n   \nthe blue fish sat on the tree .\n'


def _refused(capsys, argv: list[str], *unwritten: pathlib.Path) -> str:
    """Runs launch.py ARGV, checks it is refused cleanly; returns the message."""
    assert launch.main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), captured.err
    assert 'Traceback' not in captured.err and captured.out == ''
    for path in unwritten:
        assert not path.exists(), path
    return lines[0]


# ---------------------------------------------------------------- predict


@pytest.fixture(scope='module')
def ft_run(tmp_path_factory, pretrained_run) -> pathlib.Path:
    """A finished tiny fine-tuning run (1 epoch of a 64-row toy task)."""
    root = tmp_path_factory.mktemp('ft')
    task = write_toy_task(root, n=64)
    workdir = root / 'run'
    assert launch.main(['finetune', '--workdir', str(workdir), '--config',
                        f'{REPO}/configs/finetune.py:custom',
                        f'--config.init_from={pretrained_run}',
                        f'--config.data.train_file={task}', '--config.num_epochs=1',
                        '--config.batch_size=16', '--config.seq_len=16']) == 0
    return workdir


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if predict gets as far as loading the checkpoint."""
    def load_run(*args, **kwargs):
        raise AssertionError('the checkpoint was loaded before the arguments were checked')
    monkeypatch.setattr(predict, 'load_run', load_run)


@pytest.mark.slow
def test_predict_reads_standard_input(ft_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr('sys.stdin', io.StringIO(TEXTS))
    out = tmp_path / 'p.jsonl'
    assert launch.main(['predict', '--workdir', str(ft_run), '--input', '-',
                        '--output', str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['text'] for r in rows] == ['the red dog ran near the house .',
                                         'the blue fish sat on the tree .']
    assert all(r['label'] in ('cool', 'warm') for r in rows)
    assert not list(tmp_path.glob('.*tmp*'))
    monkeypatch.setattr('sys.stdin', io.StringIO(TEXTS))  # and to stdout
    capsys.readouterr()
    assert launch.main(['predict', '--workdir', str(ft_run), '--input', '-']) == 0
    assert capsys.readouterr().out == out.read_text()


@pytest.mark.slow
@pytest.mark.parametrize('name, content, expected', [
    ('empty.txt', b'', 'has no text to predict'),
    ('blank.txt', b'  \n\t\n\n', 'has no text to predict'),
    ('blob.bin', b'PK\x03\x04\x00\x00\xff\xfe' * 8, 'looks binary (a NUL byte on line 1)'),
    ('blob.csv', b'text\nfine\n\x00\x01\x02', 'looks binary (a NUL byte on line 3)'),
    ('latin1.txt', 'caf\xe9\n'.encode('latin-1'), 'line 1: not valid UTF-8'),
    ('header.csv', b'text,label\n', 'no examples in the file'),
    ('nocolumn.csv', b'sentence\nhello\n', "no column 'text'"),
])
def test_predict_refuses_unusable_input(ft_run, tmp_path, capsys, no_model, name, content,
                                        expected):
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / 'p.jsonl'
    message = _refused(capsys, ['predict', '--workdir', ft_run, '--input', src,
                                '--output', out], out)
    assert message.startswith('error: --input: ') and expected in message, message


@pytest.mark.slow
def test_predict_refuses_empty_standard_input(ft_run, tmp_path, monkeypatch, capsys,
                                              no_model):
    monkeypatch.setattr('sys.stdin', io.StringIO('\n \n'))
    out = tmp_path / 'p.jsonl'
    message = _refused(capsys, ['predict', '--workdir', ft_run, '--input', '-',
                                '--output', out], out)
    assert message == ('error: --input: standard input has no text to predict (empty or '
                       'blank lines only; expected one text a line)')


@pytest.mark.slow
def test_predict_checks_output_before_predicting(ft_run, tmp_path, capsys, no_model):
    src = tmp_path / 'in.txt'
    src.write_text(TEXTS)
    missing = tmp_path / 'missing' / 'p.jsonl'
    message = _refused(capsys, ['predict', '--workdir', ft_run, '--input', src,
                                '--output', missing], missing.parent)
    assert message == f"error: --output: the folder '{missing.parent}' does not exist"
    folder = tmp_path / 'out'
    folder.mkdir()
    message = _refused(capsys, ['predict', '--workdir', ft_run, '--input', src,
                                '--output', folder])
    assert message == f'error: --output: {folder} is a directory; give a file path'
    assert not list(folder.iterdir())
    message = _refused(capsys, ['predict', '--workdir', ft_run, '--input', src,
                                '--output', src])
    assert message == f'error: --output: {src} is the --input file'
    assert src.read_text() == TEXTS
    assert sorted(p.name for p in tmp_path.iterdir()) == ['in.txt', 'out']


@pytest.mark.slow
def test_predict_refuses_a_run_with_an_empty_best_dir(ft_run, tmp_path, capsys):
    run = tmp_path / 'run'
    shutil.copytree(ft_run, run, ignore=lambda d, names: names if d.endswith('best') else [])
    assert (run / 'best').is_dir() and not list((run / 'best').iterdir())
    src = tmp_path / 'in.txt'
    src.write_text(TEXTS)
    out = tmp_path / 'p.jsonl'
    message = _refused(capsys, ['predict', '--workdir', run, '--input', src,
                                '--output', out], out)
    assert message == (f'error: --workdir: {run / "best"} holds no checkpoint; is it a '
                       'finished fine-tuning run?')


# ---------------------------------------------------------------- import


@pytest.fixture(scope='module')
def hf_bert(tmp_path_factory) -> pathlib.Path:
    """A valid tiny transformers BERT directory (safetensors weights, WordPiece vocab.txt),
    as tests/test_convert.py's _hf_wordpiece_bert writes it; tests corrupt copies of it."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    directory = tmp_path_factory.mktemp('hf') / 'bert'
    vocab = ['[PAD]', '[unused0]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', '.',
             *'abcdefghijklmnopqrstuvwxyz', *(f'##{c}' for c in 'abcdefghijklmnopqrstuvwxyz')]
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    transformers.BertForMaskedLM(config).save_pretrained(str(directory))
    (directory / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    (directory / 'tokenizer_config.json').write_text(json.dumps({'do_lower_case': True}))
    assert (directory / 'model.safetensors').is_file()
    return directory


@pytest.fixture
def hf_copy(hf_bert, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(hf_bert, tmp_path / 'hf'))


def _import_refused(capsys, hf_dir: pathlib.Path, tmp_path: pathlib.Path) -> str:
    workdir = tmp_path / 'w'
    message = _refused(capsys, ['import', '--hf-dir', hf_dir, '--workdir', workdir], workdir)
    assert not list(tmp_path.glob('.w.tmp-*'))
    return message


def test_import_of_the_uncorrupted_copy_works(hf_copy, tmp_path):
    assert launch.main(['import', '--hf-dir', str(hf_copy), '--workdir',
                        str(tmp_path / 'w')]) == 0
    assert (tmp_path / 'w' / 'checkpoints' / '0').is_dir()


@pytest.mark.parametrize('damage', ['truncated', 'garbled_header', 'garbled_data_size'])
def test_import_refuses_a_damaged_safetensors_file(hf_copy, tmp_path, capsys, damage):
    weights = hf_copy / 'model.safetensors'
    raw = weights.read_bytes()
    if damage == 'truncated':
        raw = raw[:len(raw) // 2]
    elif damage == 'garbled_header':
        raw = raw[:8] + b'\xff' * 32 + raw[40:]
    else:  # header length field says more than the file holds
        raw = (10 ** 9).to_bytes(8, 'little') + raw[8:]
    weights.write_bytes(raw)
    message = _import_refused(capsys, hf_copy, tmp_path)
    assert message.startswith('error: --hf-dir: model.safetensors is not a readable '
                              'safetensors file (truncated or corrupt? '), message


@pytest.mark.parametrize('model_type', [None, 'xlm-roberta', ''])
def test_import_requires_a_known_model_type(hf_copy, tmp_path, capsys, model_type):
    config = json.loads((hf_copy / 'config.json').read_text())
    assert config['model_type'] == 'bert'
    if model_type is None:
        del config['model_type']
    else:
        config['model_type'] = model_type
    (hf_copy / 'config.json').write_text(json.dumps(config))
    found = 'no model_type' if model_type is None else f'model_type {model_type!r}'
    assert _import_refused(capsys, hf_copy, tmp_path) == (
        f"error: --hf-dir: config.json has {found}; only model_type 'bert', 'roberta', "
        "'electra', 'distilbert' or 'modernbert' can be imported")


def test_import_refuses_garbled_config_json(hf_copy, tmp_path, capsys):
    (hf_copy / 'config.json').write_text('{"model_type": "bert",')
    message = _import_refused(capsys, hf_copy, tmp_path)
    assert message.startswith(f'error: --hf-dir: {hf_copy / "config.json"} is not valid JSON')


@pytest.mark.parametrize('where', ['parent', 'absolute', 'backslash'])
def test_import_refuses_shards_outside_the_hf_dir(hf_copy, tmp_path, capsys, where):
    outside = tmp_path / 'x.safetensors'  # a valid weights file, but not --hf-dir's
    (hf_copy / 'model.safetensors').rename(outside)
    name = {'parent': '../x.safetensors', 'absolute': str(outside),
            'backslash': '..\\x.safetensors'}[where]
    index = {'metadata': {}, 'weight_map': {'bert.embeddings.word_embeddings.weight': name}}
    (hf_copy / 'model.safetensors.index.json').write_text(json.dumps(index))
    message = _import_refused(capsys, hf_copy, tmp_path)
    assert message == (f'error: --hf-dir: model.safetensors.index.json names shard {name!r} '
                       f'outside {hf_copy}; shards must be files inside --hf-dir')


def test_import_refuses_an_index_naming_a_missing_shard(hf_copy, tmp_path, capsys):
    (hf_copy / 'model.safetensors').rename(hf_copy / 'model-00001-of-00002.safetensors')
    index = {'weight_map': {'a': 'model-00001-of-00002.safetensors',
                            'b': 'model-00002-of-00002.safetensors'}}
    (hf_copy / 'model.safetensors.index.json').write_text(json.dumps(index))
    assert _import_refused(capsys, hf_copy, tmp_path) == (
        "error: --hf-dir: model.safetensors.index.json names shard "
        f"'model-00002-of-00002.safetensors', which is not in {hf_copy}")
