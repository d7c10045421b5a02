"""`launch.py import` / `export` of ModernBERT against transformers itself.

A small random ModernBertForMaskedLM in the public checkpoints' layout (no biases, GeGLU,
global layers every 3rd with rope base 160000, local ones with 10000 and a window smaller
than the test sequences) and a byte-level BPE tokenizer with [UNK] [CLS] [SEP] [PAD] [MASK]
at the highest ids, saved with save_pretrained, imported, compared (hidden states, MLM
logits, tokenizer ids), exported back (weights identical).
"""

import dataclasses
import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import launch  # noqa: E402
from convert import modernbert, verify  # noqa: E402
from engine.checkpoint import read_params_numpy, read_state_numpy  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from finetune.data import Examples  # noqa: E402
from finetune.encoding import encode  # noqa: E402
from models.bert import BertConfig, BertModel  # noqa: E402
from tests.helpers import make_sentences  # noqa: E402
from text.tokenizer import load_tokenizer, tokenizer_file  # noqa: E402

TEXTS = (*verify.SENTENCES,
         'Hello, world! [MASK] is here.', 'ALL CAPS AND 1234567890', 'x', '...?!',
         'Kalomi tersun raven dopi nor galshu.', 'trailing space ', "it's 5 o'clock; isn't it?",
         'a [MASK] b [MASK] c', 'unicode: ñ ü ß 中文 日本語', 'line one\nline two')
SPECIALS = ('[UNK]', '[CLS]', '[SEP]', '[PAD]', '[MASK]')  # ModernBERT's order, at the end
WINDOW = 8


def _tokenizer(directory: pathlib.Path):
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(make_sentences(300) + list(TEXTS), vocab_size=400, min_frequency=1,
                            special_tokens=['<|endoftext|>'])
    inner = bpe._tokenizer
    inner.add_special_tokens([AddedToken(t, lstrip=t == '[MASK]') for t in SPECIALS])
    cls, sep = inner.token_to_id('[CLS]'), inner.token_to_id('[SEP]')
    inner.post_processor = TemplateProcessing(
        single='[CLS]:0 $A:0 [SEP]:0', pair='[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0',
        special_tokens=[('[CLS]', cls), ('[SEP]', sep)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=inner, unk_token='[UNK]', cls_token='[CLS]', sep_token='[SEP]',
        pad_token='[PAD]', mask_token='[MASK]', bos_token='[CLS]', eos_token='[SEP]')
    tok.save_pretrained(str(directory))
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def _hf_modernbert(directory: pathlib.Path):
    tok = _tokenizer(directory)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    config = transformers.ModernBertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=128, local_attention=WINDOW,
        global_attn_every_n_layers=3, global_rope_theta=160000.0, local_rope_theta=10000.0,
        pad_token_id=ids['[PAD]'], cls_token_id=ids['[CLS]'], sep_token_id=ids['[SEP]'],
        bos_token_id=ids['[CLS]'], eos_token_id=ids['[SEP]'], attn_implementation='eager')
    model = transformers.ModernBertForMaskedLM(config)
    torch.manual_seed(0)
    with torch.no_grad():  # every parameter random, so no mapping error can hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(directory))
    return model.eval(), tok


@pytest.fixture(scope='module')
def modern(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp('modernbert')
    model, tok = _hf_modernbert(root / 'hf')
    return {'root': root, 'model': model, 'tok': tok}


def _import(hf_dir, workdir, capsys) -> str:
    assert launch.main(['import', '--hf-dir', str(hf_dir), '--workdir', str(workdir)]) == 0
    return capsys.readouterr().out



def _pairs(texts):
    return list(zip(texts, texts[1:] + texts[:1], strict=True))


def _hf_ids(tok, texts, pairs: bool) -> list[list[int]]:
    if pairs:
        return [tok(a, b)['input_ids'] for a, b in _pairs(texts)]
    return [tok(t)['input_ids'] for t in texts]


def _our_ids(tokenizer, texts, pairs: bool) -> list[list[int]]:
    examples = Examples(text_a=list(texts), text_b=list(texts[1:] + texts[:1]) if pairs else None,
                        labels=np.zeros(len(texts), np.int32))
    batch = encode(tokenizer, examples, 256)  # no truncation
    return [row[mask.astype(bool)].tolist()
            for row, mask in zip(batch['input_ids'], batch['attention_mask'], strict=True)]


@pytest.mark.slow
def test_modernbert_import_matches_transformers(modern, tmp_path, capsys):
    work = tmp_path / 'w'
    stdout = _import(modern['root'] / 'hf', work, capsys)
    assert 'bpe tokenizer (special tokens moved to ids 0..4); MLM head imported' in stdout
    assert 'not imported' not in stdout
    tok, ours = modern['tok'], load_tokenizer(tokenizer_file(str(work)))
    roles = ('pad_token', 'unk_token', 'cls_token', 'sep_token', 'mask_token')
    order = [tok.convert_tokens_to_ids(getattr(tok, r)) for r in roles]  # our id -> theirs
    order += [tok.convert_tokens_to_ids(ours.id_to_piece(i)) for i in range(5, ours.vocab_size)]
    assert min(order[:5]) >= 400 and sorted(order) == list(range(len(tok)))
    texts = list(TEXTS)
    for pairs in (False, True):  # 20 texts alone, 20 pairs ([CLS] a [SEP] b [SEP])
        theirs = _hf_ids(tok, texts, pairs)
        assert [[order[i] for i in row] for row in _our_ids(ours, texts, pairs)] == theirs
    m = BertConfig(**json.loads((work / 'config.json').read_text())['model'])
    assert (m.rope_theta, m.local_rope_theta, m.local_attention_window,
            m.global_attention_every, m.mlp, m.use_bias, m.type_vocab_size) == (
        160000.0, 10000.0, WINDOW, 3, 'geglu', False, 1)
    enc = tok(texts[:12], texts[1:13], padding=True, return_tensors='pt')
    assert enc['input_ids'].shape[1] > 4 * WINDOW  # the window (local layers) matters
    with torch.no_grad():
        out = modern['model'](input_ids=enc['input_ids'], attention_mask=enc['attention_mask'],
                              output_hidden_states=True)
    params = read_state_numpy(str(work / 'checkpoints'))['params']
    batch = {'input_ids': np.argsort(order)[enc['input_ids'].numpy()],
             'token_type_ids': np.zeros_like(enc['input_ids'].numpy()),
             'attention_mask': enc['attention_mask'].numpy()}
    mask = batch['attention_mask'].astype(bool)

    def hidden(cfg):
        return np.asarray(BertModel(cfg).apply({'params': params['bert']}, batch['input_ids'],
                                               batch['token_type_ids'],
                                               batch['attention_mask'])[0])[mask]

    theirs = out.hidden_states[-1].numpy()[mask]
    np.testing.assert_allclose(hidden(m), theirs, atol=1e-4)
    logits = verify.our_logits('mlm', m, params, batch)
    np.testing.assert_allclose(logits[mask], out.logits.numpy()[..., order][mask], atol=1e-4)
    # Both rope bases and the window matter here: without either, the states differ.
    for other in ({'local_rope_theta': 0.0}, {'local_attention_window': 0}):
        assert np.abs(hidden(dataclasses.replace(m, **other)) - theirs).max() > 1e-2, other


@pytest.mark.slow
def test_modernbert_export_gives_the_original_weights_and_tokenizer(modern, tmp_path, capsys):
    hf_dir, work, out, back = modern['root'] / 'hf', *(tmp_path / n for n in ('w', 'o', 'b'))
    _import(hf_dir, work, capsys)
    assert launch.main(['export', '--workdir', str(work), '--output', str(out)]) == 0
    stdout = capsys.readouterr().out
    assert 'exported ModernBertForMaskedLM' in stdout and 'tokenizer: 20/20' in stdout, stdout
    from safetensors.numpy import load_file
    original, exported = (load_file(str(d / 'model.safetensors')) for d in (hf_dir, out))
    assert set(original) == set(exported) and 'decoder.weight' not in exported  # tied
    for key, value in original.items():
        assert np.array_equal(exported[key], value), key
    config = transformers.AutoConfig.from_pretrained(str(out))
    theirs = modern['model'].config
    assert config.rope_parameters == theirs.rope_parameters
    assert (config.layer_types, config.local_attention, config.pad_token_id,
            config.cls_token_id, config.tie_word_embeddings) == (
        theirs.layer_types, WINDOW, theirs.pad_token_id, theirs.cls_token_id, True)
    exported_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for pairs in (False, True):
        assert (_hf_ids(exported_tok, list(TEXTS), pairs)
                == _hf_ids(modern['tok'], list(TEXTS), pairs))
    _import(out, back, capsys)  # the export imports to the same parameters and tokenizer
    first, again = (read_params_numpy(str(d / 'checkpoints')) for d in (work, back))
    assert first.keys() == again.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert (work / 'wordpiece.json').read_bytes() == (back / 'wordpiece.json').read_bytes()


def _copy(modern, tmp_path) -> pathlib.Path:
    import shutil
    hf = tmp_path / 'hf'
    shutil.copytree(modern['root'] / 'hf', hf)
    return hf


@pytest.mark.slow
def test_untied_decoder_is_refused_and_a_bare_model_gets_a_fresh_head(modern, tmp_path,
                                                                       capsys):
    from safetensors.numpy import load_file, save_file
    hf = _copy(modern, tmp_path)
    weights = load_file(str(hf / 'model.safetensors'))
    untied = {**weights,
              'decoder.weight': weights['model.embeddings.tok_embeddings.weight'] + 1.0}
    save_file(untied, str(hf / 'model.safetensors'), metadata={'format': 'pt'})
    assert launch.main(['import', '--hf-dir', str(hf), '--workdir', str(tmp_path / 'w')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'decoder.weight differs from tok_embeddings' in err[0], err
    assert not (tmp_path / 'w').exists()
    # A bare ModernBertModel (no 'model.' prefix, no head): encoder imported, head fresh.
    bare = {k.removeprefix('model.'): v for k, v in weights.items() if k.startswith('model.')}
    save_file(bare, str(hf / 'model.safetensors'), metadata={'format': 'pt'})
    stdout = _import(hf, tmp_path / 'bare', capsys)
    assert 'MLM head freshly initialised' in stdout, stdout
    params = read_params_numpy(str(tmp_path / 'bare' / 'checkpoints'))
    np.testing.assert_array_equal(
        params['bert/encoder/layer_1/attention/output/LayerNorm/scale'],
        weights['model.layers.1.attn_norm.weight'])


def test_modernbert_config_fields_and_refusals():
    base = {'vocab_size': 50, 'hidden_size': 32, 'num_hidden_layers': 4,
            'num_attention_heads': 2, 'intermediate_size': 48}
    fields = modernbert.model_fields({**base, 'hidden_activation': 'silu', 'norm_bias': True,
                                      'attention_bias': True, 'mlp_bias': True,
                                      'classifier_bias': True, 'local_attention': 129,
                                      'global_rope_theta': 500.0, 'local_rope_theta': 500.0})
    assert (fields['mlp'], fields['use_bias'], fields['local_attention_window'],
            fields['global_attention_every'], fields['rope_theta'],
            fields['local_rope_theta']) == ('swiglu', True, 128, 3, 500.0, 0.0)
    # transformers >= 5 spelling: layer_types and rope_parameters
    new = modernbert.model_fields({**base, 'layer_types': ['full_attention'] * 4,
                                   'rope_parameters': {
                                       'full_attention': {'rope_theta': 8.0},
                                       'sliding_attention': {'rope_theta': 2.0}}})
    assert (new['local_attention_window'], new['rope_theta'], new['local_rope_theta']) == (
        0, 8.0, 2.0)
    BertConfig(**{k: v for k, v in new.items()})  # a valid model
    for bad, message in (
            ({'layer_types': ['full_attention', 'sliding_attention', 'full_attention',
                              'full_attention']}, 'only "layer i global when i % N == 0"'),
            ({'hidden_activation': 'relu'}, "hidden_activation 'relu'"),
            ({'norm_bias': True}, 'one use_bias'),
            ({'rope_parameters': {'full_attention': {'rope_type': 'yarn'}}},
             "rope_type 'yarn'")):
        with pytest.raises(ConfigError, match=message.replace('(', r'\(')):
            modernbert.model_fields({**base, **bad})
    # A classifier's head.* pools for its classifier: no MLM head to import.
    assert modernbert.has_head({'head.dense.weight': 0, 'decoder.bias': 0})
    assert not modernbert.has_head({'head.dense.weight': 0, 'classifier.weight': 0})
    with pytest.raises(ValueError, match='local_rope_theta must be >= 0'):
        BertConfig(vocab_size=50, position_embedding='rope', local_rope_theta=-1.0)


@pytest.mark.slow
def test_imported_modernbert_continues_pretraining_and_fine_tunes(modern, tmp_path, corpus,
                                                                  capsys):
    from tests.helpers import REPO, write_toy_task
    work, cpt, ft = tmp_path / 'w', tmp_path / 'cpt', tmp_path / 'ft'
    _import(modern['root'] / 'hf', work, capsys)
    small = ['--config.optimizer.warmup_steps=1', '--config.batch_size=8',
             '--config.seq_len=32', '--config.eval_max_batches=1']
    assert launch.main(['pretrain', '--config', str(work / 'config.json'), '--workdir', str(cpt),
                        f'--config.init_from={work}', f'--config.data.train_files={corpus}',
                        '--config.num_train_steps=2', *small]) == 0
    before = read_params_numpy(str(work / 'checkpoints'))
    after = read_params_numpy(str(cpt / 'checkpoints'), 2)
    key = 'bert/encoder/layer_1/attention/self/query/kernel'
    assert not np.array_equal(before[key], after[key])  # it trained from the import
    task = write_toy_task(tmp_path, 40)
    assert launch.main(['finetune', '--config', f'{REPO}/configs/finetune.py:custom',
                        '--workdir', str(ft), f'--config.init_from={cpt}',
                        f'--config.data.train_file={task}', '--config.num_epochs=1',
                        '--config.batch_size=8', '--config.seq_len=32']) == 0
    assert (ft / 'results.json').is_file()
