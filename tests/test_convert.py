"""Hugging Face transformers round trip: export, load in PyTorch, compare, import back."""

import json
import pathlib
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import launch  # noqa: E402
from convert import export, names, verify  # noqa: E402
from engine.checkpoint import read_params_numpy  # noqa: E402
from finetune import predict  # noqa: E402
from models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification  # noqa: E402
from tests.helpers import REPO, sentence, small_tokenizer  # noqa: E402
from text.tokenizer import load_tokenizer, tokenizer_file  # noqa: E402

# vocab_size: small_tokenizer's 150 pieces
TINY = BertConfig(vocab_size=150, hidden_size=32, num_layers=2, num_heads=2,
                  intermediate_size=64, max_position_embeddings=64, num_labels=3)


def _diff(stdout: str) -> float:
    line = next(x for x in stdout.splitlines() if x.startswith('max |logit diff|: '))
    return float(line.split()[3])


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict[str, str]:
    """A 2-class task on the templated corpus (the label is the adjective's group)."""
    root = tmp_path_factory.mktemp('task')
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (('train', 64), ('validation', 32)):
        rows = [sentence(rng) for _ in range(n)]
        lines = ['text,label'] + [f'{t},{"warm" if a in ("red", "big") else "cool"}'
                                  for t, a in rows]
        (root / f'{split}.csv').write_text('\n'.join(lines) + '\n')
        out[split] = str(root / f'{split}.csv')
    return out


def _finetune_args(init_from, files, workdir) -> list:
    return ['finetune', '--config', f'{REPO}/configs/finetune.py:custom', '--workdir', workdir,
            f'--config.init_from={init_from}', f'--config.data.train_file={files["train"]}',
            f'--config.data.validation_file={files["validation"]}', '--config.num_epochs=1',
            '--config.batch_size=16', '--config.seq_len=16', '--config.learning_rate=2e-3',
            '--config.model.pooling=cls']  # [CLS]: BertForSequenceClassification's pooling


def _write_hf(directory: pathlib.Path, params, head: str, task: dict | None = None) -> None:
    """Our params as a transformers directory, written with the name map alone."""
    from safetensors.numpy import save_file
    directory.mkdir()
    save_file(names.to_hf(params, TINY.num_layers, head), str(directory / 'model.safetensors'),
              metadata={'format': 'pt'})
    (directory / 'config.json').write_text(json.dumps(export.hf_config(head, TINY, task or {})))


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict:
    """Random (noisy) params + a sentencepiece model as an HF directory -> import -> export
    (verified) -> import again."""
    root = tmp_path_factory.mktemp('runs')
    tok = small_tokenizer(root)
    model = BertForMaskedLM(TINY)
    ids = np.zeros((1, 8), np.int32)
    params = _noisy(nn.unbox(model.init(jax.random.key(0), ids, ids)['params']), 2)
    out = {'params': params, 'src': root / 'src', 'pre': root / 'pre', 'hf': root / 'hf',
           'back': root / 'back'}
    _write_hf(out['src'], params, 'mlm')
    shutil.copyfile(tok.path, out['src'] / 'spm.model')
    capture = _Capture()
    assert launch.main(['import', '--hf-dir', str(out['src']), '--workdir', str(out['pre'])]) == 0
    with capture:
        assert launch.main(['export', '--workdir', str(out['pre']), '--output',
                            str(out['hf'])]) == 0
    out['export_stdout'] = capture.text
    assert launch.main(['import', '--hf-dir', str(out['hf']), '--workdir',
                        str(out['back'])]) == 0
    return out


class _Capture:
    """Captures stdout of launch.main inside a module fixture (capsys is function-scoped)."""

    def __enter__(self):
        import contextlib
        import io
        self._buf = io.StringIO()
        self._ctx = contextlib.redirect_stdout(self._buf)
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self.text = self._buf.getvalue()


def _noisy(params, seed: int):
    """Every leaf random (biases and LayerNorm too), so no mapping error can hide."""
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [rng.normal(0, 0.5, np.shape(x)).astype(np.float32)
                                     for x in leaves])


@pytest.mark.slow
@pytest.mark.parametrize('head', ['mlm', 'classifier'])
def test_random_params_match_transformers(tmp_path, runs, head):
    tok = load_tokenizer(str(runs['pre'] / 'spm.model'))
    model = BertForMaskedLM(TINY) if head == 'mlm' else BertForSequenceClassification(TINY)
    ids = np.zeros((1, 8), np.int32)
    args = (ids, ids) if head == 'mlm' else (ids,)
    params = _noisy(nn.unbox(model.init(jax.random.key(0), *args)['params']), 1)
    _write_hf(tmp_path / 'hf', params, head, {'task': 'classification',
                                             'label_names': ['a', 'b', 'c']})
    batch = verify.fixed_batch(tok, pairs=head == 'classifier', max_len=48)
    assert batch['attention_mask'].min() == 0  # padding in the batch
    ours = verify.our_logits(head, TINY, params, batch)
    theirs = verify.hf_logits(tmp_path / 'hf', head, batch)  # raises on missing/unused weights
    assert verify.max_logit_diff(head, ours, theirs, batch['attention_mask']) < 1e-4
    back = names.from_hf(names.to_hf(params, TINY.num_layers, head), TINY.num_layers, head)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, jax.tree.map(np.asarray, params)))


def test_random_init_export_loads_and_matches(runs):
    assert _diff(runs['export_stdout']) <= 1e-4
    assert 'tokenizer: 20/20 fixed inputs give the same ids' in runs['export_stdout']
    hf = runs['hf']
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json',
            'special_tokens_map.json', 'spm.model'} <= {p.name for p in hf.iterdir()}
    assert not list(hf.parent.glob('.hf.tmp-*'))
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
            tok.mask_token_id] == [0, 1, 2, 3, 4]
    ours = load_tokenizer(tokenizer_file(str(runs['pre'])))
    for text in ('the red cat sat on the tree .', 'Kalo miter sun!', '  Galdo  kater. '):
        assert tok(text)['input_ids'] == [2, *ours.encode(text), 3]
    fill = transformers.pipeline('fill-mask', model=str(hf))
    assert len(fill('Kalo [MASK] sun.', top_k=3)) == 3


def test_import_back_gives_equal_params_tokenizer_and_architecture(runs):
    """Everything fine-tuning reads from a workdir is identical, so it fine-tunes alike."""
    a, b = read_params_numpy(str(runs['pre'] / 'checkpoints')), read_params_numpy(
        str(runs['back'] / 'checkpoints'))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    flat = jax.tree_util.tree_flatten_with_path(runs['params'])[0]
    original = {'/'.join(k.key for k in path): np.asarray(v) for path, v in flat}
    assert original.keys() == a.keys() and all(np.array_equal(original[k], a[k]) for k in a)
    assert (runs['pre'] / 'spm.model').read_bytes() == (runs['back'] / 'spm.model').read_bytes()
    config = [json.loads((runs[k] / 'config.json').read_text()) for k in ('pre', 'back')]
    assert config[0]['model'] == {k: v for k, v in config[1]['model'].items()
                                  if k in config[0]['model']}
    assert BertConfig(**config[0]['model']) == BertConfig(**config[1]['model'])


@pytest.mark.slow
def test_finetuned_classifier_round_trip_predicts_alike(wordpiece):
    assert _diff(wordpiece['export_stdout']) <= 1e-4
    assert 'tokenizer: 20/20 fixed inputs give the same ids' in wordpiece['export_stdout']
    hf_dir = wordpiece['hf_ft']
    config = json.loads((hf_dir / 'config.json').read_text())
    assert config['architectures'] == ['BertForSequenceClassification']
    assert config['id2label'] == {'0': 'cool', '1': 'warm'}
    _, model, params, labels = predict.load_run(wordpiece['ft'])
    texts = ['the red dog ran near the house .', 'the blue fish sat .',
             'the old bird flew over the garden and the river .']
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(hf_dir))
    enc = tok(texts, padding=True, return_tensors='pt')
    assert enc['attention_mask'].min() == 0
    with torch.no_grad():
        theirs = hf(**enc).logits.numpy()
    # The export keeps the imported BERT's original ids; our model has [PAD]..[MASK] at 0..4.
    ours_tok = load_tokenizer(tokenizer_file(str(wordpiece['ft'])))
    our_id = {ours_tok.id_to_piece(i): i for i in range(ours_tok.vocab_size)}
    to_ours = np.array([our_id[p] for p in (hf_dir / 'vocab.txt').read_text().splitlines()])
    ours = np.asarray(model.apply({'params': params}, to_ours[enc['input_ids'].numpy()],
                                  token_type_ids=enc['token_type_ids'].numpy(),
                                  attention_mask=enc['attention_mask'].numpy()))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert [labels[i] for i in ours.argmax(-1)] == [hf.config.id2label[i]
                                                     for i in theirs.argmax(-1)]


def test_export_failure_leaves_nothing(runs, tmp_path, capsys):
    out = tmp_path / 'hf'
    assert launch.main(['export', '--workdir', str(runs['pre']), '--output', str(out),
                        '--step', '999']) == 2
    assert 'error: --step' in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob('.hf.tmp-*'))
    assert launch.main(['export', '--workdir', str(runs['pre']), '--output',
                        str(runs['hf'])]) == 2  # exists already


def _hf_wordpiece_bert(directory: pathlib.Path) -> list[str]:
    """A tiny random transformers BERT with a WordPiece vocab.txt in BERT's layout (special
    tokens not at 0..4); returns the vocabulary."""
    from tests.helpers import ADJECTIVES, NOUNS, PLACES, VERBS
    vocab = ['[PAD]', '[unused0]', '[unused1]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', '.',
             *ADJECTIVES, *NOUNS, *VERBS, *PLACES, *'abcdefghijklmnopqrstuvwxyz',
             *(f'##{c}' for c in 'abcdefghijklmnopqrstuvwxyz'), '##ed']
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial biases and LayerNorm too
    model.save_pretrained(str(directory))
    (directory / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    (directory / 'tokenizer_config.json').write_text(json.dumps({'do_lower_case': True}))
    return vocab


def test_import_takes_no_tokenizer_from_a_parent_folder_unless_trainer_output(tmp_path,
                                                                           capsys):
    parent = tmp_path / 'models'
    _hf_wordpiece_bert(parent / 'bert')
    for name in ('vocab.txt', 'tokenizer_config.json'):  # the tokenizer only one level up
        (parent / 'bert' / name).rename(parent / name)
    assert launch.main(['import', '--hf-dir', str(parent / 'bert'), '--workdir',
                        str(tmp_path / 'w')]) == 2
    assert 'no tokenizer in' in capsys.readouterr().err and not (tmp_path / 'w').exists()
    (parent / 'bert').rename(parent / 'checkpoint-5')  # Trainer output: run folder + checkpoint
    assert launch.main(['import', '--hf-dir', str(parent), '--workdir',
                        str(tmp_path / 'w')]) == 0
    assert (tmp_path / 'w' / 'wordpiece.json').is_file()


@pytest.fixture(scope='module')
def wordpiece(tmp_path_factory, corpus, files) -> dict:
    """A transformers WordPiece BERT imported, pretrained a step, fine-tuned, exported."""
    root = tmp_path_factory.mktemp('wordpiece')
    out = {'hf': root / 'hf', 'work': root / 'wp', 'ft': root / 'ft', 'hf_ft': root / 'hf_ft'}
    _hf_wordpiece_bert(out['hf'])
    capture = _Capture()
    with capture:
        assert launch.main(['import', '--hf-dir', str(out['hf']), '--workdir',
                            str(out['work'])]) == 0
    out['import_stdout'] = capture.text
    out['imported'] = read_params_numpy(str(out['work'] / 'checkpoints'))
    work = out['work']
    assert launch.main([str(a) for a in (
        'pretrain', '--config', work / 'config.json', '--workdir', work,
        f'--config.data.train_files={corpus}', '--config.num_train_steps=2',
        '--config.optimizer.warmup_steps=0', '--config.batch_size=8', '--config.seq_len=32',
        '--config.eval_max_batches=1')]) == 0
    with capture:
        assert launch.main(['export', '--workdir', str(work), '--output',
                            str(root / 'hf_mlm')]) == 0
    out['export_mlm_stdout'] = capture.text
    assert launch.main([str(a) for a in _finetune_args(work, files, out['ft'])]) == 0
    with capture:
        assert launch.main(['export', '--workdir', str(out['ft']), '--output',
                            str(out['hf_ft'])]) == 0
    out['export_stdout'] = capture.text
    return out


def test_wordpiece_import_matches_transformers_and_trains(wordpiece):
    hf_dir, work = wordpiece['hf'], wordpiece['work']
    assert 'special tokens moved to ids 0..4' in wordpiece['import_stdout']
    assert json.loads((work / 'config.json').read_text())['data']['tokenizer_type'] == \
        'wordpiece'
    ours = load_tokenizer(tokenizer_file(str(work)))
    theirs = transformers.BertTokenizer.from_pretrained(str(hf_dir))
    texts = ['The Red cat jumped over the GARDEN.', 'a quiet horse walks', 'zebras?']
    for text in texts:
        assert [ours.id_to_piece(i) for i in ours.encode(text)] == theirs.tokenize(text)
    # The same model: our logits over our (reordered) ids are transformers' over its ids.
    order = [theirs.convert_tokens_to_ids(ours.id_to_piece(i)) for i in range(ours.vocab_size)]
    assert order[:5] == [0, 3, 4, 5, 6]
    enc = theirs(texts, padding=True, return_tensors='pt')
    with torch.no_grad():
        expected = transformers.BertForMaskedLM.from_pretrained(str(hf_dir))(**enc).logits
    model_cfg = BertConfig(**json.loads((work / 'config.json').read_text())['model'])
    params = {}
    for key, value in wordpiece['imported'].items():
        node = params
        *parents, leaf = key.split('/')
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    batch = {'input_ids': np.argsort(order)[enc['input_ids'].numpy()],
             'token_type_ids': enc['token_type_ids'].numpy(),
             'attention_mask': enc['attention_mask'].numpy()}
    got = verify.our_logits('mlm', model_cfg, params, batch)
    mask = batch['attention_mask'].astype(bool)
    np.testing.assert_allclose(got[mask], expected.numpy()[..., order][mask], atol=1e-4)
    # Pretraining went on from the import and changed every parameter; the trained model
    # exports within tolerance; fine-tuning used the WordPiece tokenizer.
    trained = read_params_numpy(str(work / 'checkpoints'), 2)
    assert not any(np.array_equal(trained[k], v) for k, v in wordpiece['imported'].items())
    assert _diff(wordpiece['export_mlm_stdout']) <= 1e-4
    assert 'tokenizer: 20/20' in wordpiece['export_mlm_stdout']
    assert (wordpiece['ft'] / 'wordpiece.json').is_file()
    assert 'accuracy' in json.loads((wordpiece['ft'] / 'results.json').read_text())['validation']


def test_wordpiece_export_restores_the_original_token_ids(tmp_path, capsys):
    """import moves BERT's special tokens to 0..4; export moves them back, so the original
    tokenizer and the exported weights give the original model's logits."""
    hf_dir, work, out, back = (tmp_path / n for n in ('hf', 'w', 'out', 'back'))
    _hf_wordpiece_bert(hf_dir)
    assert launch.main(['import', '--hf-dir', str(hf_dir), '--workdir', str(work)]) == 0
    assert launch.main(['export', '--workdir', str(work), '--output', str(out)]) == 0
    stdout = capsys.readouterr().out
    assert _diff(stdout) <= 1e-4 and 'tokenizer: 20/20' in stdout
    assert (out / 'vocab.txt').read_bytes() == (hf_dir / 'vocab.txt').read_bytes()
    assert json.loads((out / 'config.json').read_text())['pad_token_id'] == 0
    texts = ['The Red cat jumped over the GARDEN.', 'a quiet horse walks', 'zebras [MASK] ?']
    original = transformers.BertTokenizer.from_pretrained(str(hf_dir))
    enc = original(texts, padding=True, return_tensors='pt')
    assert transformers.AutoTokenizer.from_pretrained(str(out))(
        texts, padding=True)['input_ids'] == enc['input_ids'].tolist()
    with torch.no_grad():
        expected = transformers.BertForMaskedLM.from_pretrained(str(hf_dir))(**enc).logits
        got = transformers.BertForMaskedLM.from_pretrained(str(out))(**enc).logits
    mask = enc['attention_mask'].bool()
    assert float((got - expected).abs()[mask].max()) <= 1e-4
    # Re-importing the export moves the ids to 0..4 again: the same params as the import.
    assert launch.main(['import', '--hf-dir', str(out), '--workdir', str(back)]) == 0
    first, again = (read_params_numpy(str(d / 'checkpoints')) for d in (work, back))
    for key, value in first.items():
        np.testing.assert_allclose(again[key], value, atol=1e-6, err_msg=key)


def test_wordpiece_export_refuses_a_vocabulary_it_cannot_restore(tmp_path, capsys):
    hf_dir, work, out = (tmp_path / n for n in ('hf', 'w', 'out'))
    _hf_wordpiece_bert(hf_dir)
    assert launch.main(['import', '--hf-dir', str(hf_dir), '--workdir', str(work)]) == 0
    capsys.readouterr()
    data = json.loads((work / 'wordpiece.json').read_text())
    data['model']['original_vocab'].append('##zz')  # not the vocabulary it was reordered from
    (work / 'wordpiece.json').write_text(json.dumps(data))
    assert launch.main(['export', '--workdir', str(work), '--output', str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'original token ids cannot be restored' in err[0]
    assert not out.exists() and not list(tmp_path.glob('.out.tmp-*'))
