"""Export of the classifiers with a ModernBERT or DistilBERT head (model.classifier_head) to
ModernBertForSequenceClassification (cls and mean pooling) and
DistilBertForSequenceClassification: logits against transformers within 1e-4, from random
params (fast) and end to end (import -> fine-tune -> export); refusals; old workdirs resume."""

import json
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import launch  # noqa: E402
from convert import export, modernbert, names, verify  # noqa: E402
from engine import resume_check  # noqa: E402
from engine.checkpoint import read_params_numpy  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from models.bert import BertConfig, BertForSequenceClassification  # noqa: E402
from tests.helpers import REPO, write_toy_task  # noqa: E402
from text.tokenizer import CLS_ID, PAD_ID, SEP_ID  # noqa: E402

TASK = {'task': 'classification', 'label_names': ['a', 'b', 'c']}
MODERN = dict(vocab_size=90, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=48,
              type_vocab_size=1, position_embedding='rope', mlp='geglu', use_bias=False,
              pre_layer_norm=True, final_norm=True, first_attention_norm=False,
              local_attention_window=4, global_attention_every=2, dropout_rate=0.0,
              attention_dropout_rate=0.0, layer_norm_eps=1e-5, num_labels=3,
              classifier_head='modernbert')
DISTIL = dict(vocab_size=90, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
              type_vocab_size=1, export_as='distilbert', classifier_head='distilbert',
              num_labels=3)


def _batch() -> dict[str, np.ndarray]:
    """Padded rows of different lengths (the longest 12), [CLS] first, [SEP] last."""
    rng = np.random.default_rng(0)
    lengths = [12, 7, 3, 10]
    ids = np.full((len(lengths), 12), PAD_ID, np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = [CLS_ID, *rng.integers(5, 90, n - 2), SEP_ID]
    mask = (ids != PAD_ID).astype(np.int64)
    return {'input_ids': ids, 'token_type_ids': np.zeros_like(ids), 'attention_mask': mask}


def _random_params(m: BertConfig) -> dict:
    """Our classifier's params, every leaf (LayerNorm scales too) randomised."""
    ids = np.zeros((1, 8), np.int32)
    params = nn.unbox(BertForSequenceClassification(m).init(jax.random.key(0), ids)['params'])
    leaves, tree = jax.tree.flatten(jax.tree.map(np.asarray, params))
    rng = np.random.default_rng(1)
    return jax.tree.unflatten(tree, [x + rng.normal(0, 0.2, x.shape).astype(np.float32)
                                     for x in leaves])


def _save(directory: pathlib.Path, tensors: dict, config: dict) -> pathlib.Path:
    from safetensors.numpy import save_file
    directory.mkdir()
    save_file(tensors, str(directory / 'model.safetensors'), metadata={'format': 'pt'})
    (directory / 'config.json').write_text(json.dumps(config))
    return directory


def _modern_dir(directory: pathlib.Path, m: BertConfig, params: dict, pooling: str):
    config = modernbert.hf_config(m, PAD_ID, CLS_ID, SEP_ID, tied=True)
    config.update(export.label_fields(TASK), classifier_pooling=pooling,
                  architectures=['ModernBertForSequenceClassification'])
    return _save(directory, modernbert.to_hf(params, m, 'classifier'), config)


@pytest.mark.parametrize('pooling', ['cls', 'mean'])
def test_modernbert_classifier_matches_transformers(tmp_path, pooling):
    m = BertConfig(**MODERN, pooling=pooling)
    params = _random_params(m)
    assert sorted(params['bert']['pooler']) == ['LayerNorm', 'dense']
    batch = _batch()
    ours = verify.our_logits('classifier', m, params, batch)
    theirs = verify.hf_logits(_modern_dir(tmp_path / 'hf', m, params, pooling), 'classifier',
                              batch)
    assert ours.shape == (4, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # The pooling written matters: the other one gives other logits (the test can fail).
    other = 'cls' if pooling == 'mean' else 'mean'
    wrong = verify.hf_logits(_modern_dir(tmp_path / 'other', m, params, other), 'classifier',
                             batch)
    assert np.abs(ours - wrong).max() > 1e-2


def test_distilbert_classifier_matches_transformers(tmp_path):
    m = BertConfig(**DISTIL)
    params = _random_params(m)
    tensors = names.to_distilbert(names.to_hf(params, m.num_layers, 'classifier'))
    assert 'pre_classifier.weight' in tensors and 'classifier.weight' in tensors
    directory = _save(tmp_path / 'hf', tensors,
                      export.distilbert_config(m, None, 'classifier', TASK))
    batch = _batch()
    theirs = verify.hf_logits(directory, 'classifier', batch)
    np.testing.assert_allclose(verify.our_logits('classifier', m, params, batch), theirs,
                               atol=1e-4)
    # Our default head (dense + tanh) on the same weights is not DistilBERT's ReLU head.
    bert_head = BertConfig(**{**DISTIL, 'classifier_head': 'bert'})
    assert np.abs(verify.our_logits('classifier', bert_head, params, batch) - theirs).max() > 1e-2


def test_default_head_is_dense_tanh():
    """classifier_head='bert' (the default) keeps the pooler a dense + tanh, no LayerNorm."""
    m = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                   intermediate_size=32)
    assert m.classifier_head == 'bert'
    params = _random_params(m)
    assert sorted(params['bert']['pooler']) == ['dense']
    with pytest.raises(ValueError, match='classifier_head must be one of'):
        BertConfig(classifier_head='tanh')


@pytest.mark.parametrize('fields, fix', [
    ({'pooling': 'mean'}, '--config.model.pooling=cls to export'),
    ({'classifier_head': 'modernbert'}, '--config.model.classifier_head=bert to export'),
    ({**MODERN, 'classifier_head': 'bert'}, '--config.model.classifier_head=modernbert to'),
    ({**DISTIL, 'pooling': 'mean'}, '--config.model.pooling=cls to export'),
    ({**DISTIL, 'classifier_head': 'bert'}, '--config.model.classifier_head=distilbert'),
])
def test_classifiers_without_a_transformers_class_are_refused_naming_the_key(fields, fix):
    with pytest.raises(ConfigError) as e:
        export.export_kind('classifier', BertConfig(**fields))
    assert fix in str(e.value) and '\n' not in str(e.value)
    if fields.get('pooling') == 'mean' and 'export_as' not in fields:
        assert 'BertForSequenceClassification' in str(e.value)


def test_a_modernbert_classifiers_head_is_its_pooler_not_an_mlm_head():
    state = modernbert.normalize_keys({'embeddings.norm.weight': 0, 'head.dense.weight': 0,
                                       'classifier.weight': 0})
    assert 'classifier.weight' in state  # not under model., where has_head would miss it
    assert modernbert.has_pooler(state) and not modernbert.has_head(state)
    assert not modernbert.has_pooler(modernbert.normalize_keys({'head.dense.weight': 0,
                                                                'decoder.bias': 0}))


def test_export_kinds_of_the_new_classifiers():
    assert export.export_kind('classifier', BertConfig(**MODERN, pooling='mean')) == 'modernbert'
    assert export.export_kind('classifier', BertConfig(**DISTIL)) == 'distilbert'
    assert export.export_kind('classifier', BertConfig()) == 'bert'


def test_workdirs_from_before_classifier_head_still_resume(tmp_path):
    """A saved config.json / model.json without the key reads as the head runs had."""
    saved = {'model': {'pooling': 'cls'}}
    resume_check.compare({'model': {'pooling': 'cls', 'classifier_head': 'bert'}}, saved, (),
                         tmp_path, 'hint')  # pretraining config
    resume_check.compare({'model': {'pooling': 'cls', 'classifier_head': ''}}, saved, (),
                         tmp_path, 'hint', added=resume_check.FINETUNE_ADDED_KEYS)
    with pytest.raises(ConfigError, match='model.classifier_head'):
        resume_check.compare({'model': {'pooling': 'cls', 'classifier_head': 'modernbert'}},
                             saved, (), tmp_path, 'hint', added=resume_check.FINETUNE_ADDED_KEYS)
    model_json = tmp_path / 'model.json'
    model_json.write_text(json.dumps({'pooling': 'cls'}))
    resume_check.check_file(model_json, {'pooling': 'cls', 'classifier_head': 'bert'},
                            tmp_path, 'model.')
    with pytest.raises(ConfigError, match='classifier_head'):
        resume_check.check_file(model_json, {'pooling': 'cls', 'classifier_head': 'distilbert'},
                                tmp_path, 'model.')


# ----------------------------------------------------------------------------- end to end


def _noise(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def _vocab(directory: pathlib.Path) -> int:
    from tests.helpers import ADJECTIVES, NOUNS, PLACES, VERBS
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', '.', *ADJECTIVES, *NOUNS,
             *VERBS, *PLACES, *'abcdefghijklmnopqrstuvwxyz',
             *(f'##{c}' for c in 'abcdefghijklmnopqrstuvwxyz')]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
    return len(vocab)


def _import_finetune_export(hf: pathlib.Path, tmp_path, capsys, *extra: str) -> tuple[str, dict]:
    work, ft, out = tmp_path / 'w', tmp_path / 'ft', tmp_path / 'out'
    assert launch.main(['import', '--hf-dir', str(hf), '--workdir', str(work)]) == 0
    imported = capsys.readouterr().out
    task = write_toy_task(tmp_path, n=48)
    assert launch.main(['finetune', '--workdir', str(ft), '--config',
                        f'{REPO}/configs/finetune.py:custom', f'--config.data.train_file={task}',
                        f'--config.init_from={work}', '--config.num_epochs=1',
                        '--config.batch_size=16', '--config.seq_len=16', *extra]) == 0
    capsys.readouterr()
    assert launch.main(['export', '--workdir', str(ft), '--output', str(out)]) == 0
    stdout = capsys.readouterr().out
    line = next(x for x in stdout.splitlines() if x.startswith('max |logit diff|: '))
    assert float(line.split()[3]) <= 1e-4, stdout
    model = json.loads((ft / 'model.json').read_text())
    return imported + stdout, {'model': model,
                               'hf': json.loads((out / 'config.json').read_text())}


@pytest.mark.slow
def test_imported_modernbert_fine_tunes_mean_pooled_and_exports_its_classifier(tmp_path,
                                                                              capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    hf = tmp_path / 'hf'
    vocab = _vocab(hf)
    pieces = (hf / 'vocab.txt').read_text().split()
    inner = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token='[UNK]'))
    inner.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=inner, unk_token='[UNK]', cls_token='[CLS]', sep_token='[SEP]',
        pad_token='[PAD]', mask_token='[MASK]').save_pretrained(str(hf))
    config = transformers.ModernBertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64, local_attention=4,
        global_attn_every_n_layers=2, pad_token_id=0, cls_token_id=2, sep_token_id=3,
        bos_token_id=2, eos_token_id=3, num_labels=2, classifier_pooling='mean')
    model = transformers.ModernBertForSequenceClassification(config)
    _noise(model, 2)
    model.save_pretrained(str(hf))
    stdout, got = _import_finetune_export(hf, tmp_path, capsys)  # custom: mean pooling
    assert 'pooler imported' in stdout  # its head.* (dense, GELU, norm): our pooler
    imported = read_params_numpy(str(tmp_path / 'w' / 'checkpoints'))
    np.testing.assert_array_equal(imported['bert/pooler/dense/kernel'],
                                  model.head.dense.weight.detach().numpy().T)
    np.testing.assert_array_equal(imported['bert/pooler/LayerNorm/scale'],
                                  model.head.norm.weight.detach().numpy())
    assert got['model']['classifier_head'] == 'modernbert'
    assert got['model']['pooling'] == 'mean'
    assert got['hf']['architectures'] == ['ModernBertForSequenceClassification']
    assert got['hf']['classifier_pooling'] == 'mean'


@pytest.mark.slow
def test_imported_distilbert_classifier_keeps_its_pre_classifier_both_ways(tmp_path, capsys):
    hf = tmp_path / 'hf'
    config = transformers.DistilBertConfig(vocab_size=_vocab(hf), dim=32, n_layers=2,
                                           n_heads=2, hidden_dim=64, max_position_embeddings=64)
    model = transformers.DistilBertForSequenceClassification(config)
    _noise(model, 4)
    model.save_pretrained(str(hf))
    transformers.BertTokenizerFast(str(hf / 'vocab.txt')).save_pretrained(str(hf))
    stdout, got = _import_finetune_export(hf, tmp_path, capsys, '--config.model.pooling=cls',
                                          '--config.learning_rate=1e-9')
    assert 'pooler imported' in stdout
    assert got['model']['classifier_head'] == 'distilbert'
    assert got['hf']['architectures'] == ['DistilBertForSequenceClassification']
    from safetensors.numpy import load_file
    exported = load_file(str(tmp_path / 'out' / 'model.safetensors'))
    original = model.pre_classifier.weight.detach().numpy()
    # Fine-tuned at a negligible rate: the pre_classifier it started from is the imported one.
    np.testing.assert_allclose(exported['pre_classifier.weight'], original, atol=1e-5)
    # The imported workdir's MLM export writes it back exactly, for the classifier to read.
    assert launch.main(['export', '--workdir', str(tmp_path / 'w'), '--output',
                        str(tmp_path / 'mlm')]) == 0
    assert 'exported DistilBertForMaskedLM' in capsys.readouterr().out
    mlm = load_file(str(tmp_path / 'mlm' / 'model.safetensors'))
    np.testing.assert_array_equal(mlm['pre_classifier.weight'], original)


@pytest.mark.slow
def test_our_modern_recipe_run_fine_tunes_with_the_modernbert_head_and_exports(tmp_path, corpus,
                                                                              capsys):
    """A run of this project (two token-type rows) fine-tuned with the head named on the
    command line; without it, export names that key."""
    from tests.helpers import tiny_args
    pre, ft, out = tmp_path / 'pre', tmp_path / 'ft', tmp_path / 'out'
    options = [f'--config.model.{k}={v}' for k, v in MODERN.items()
               if k in ('position_embedding', 'mlp', 'use_bias', 'pre_layer_norm', 'final_norm',
                        'first_attention_norm', 'local_attention_window')]
    assert launch.main(['pretrain', '--workdir', str(pre), *tiny_args(corpus, 2), *options]) == 0
    task = write_toy_task(tmp_path, n=48)
    args = ['--config', f'{REPO}/configs/finetune.py:custom', f'--config.data.train_file={task}',
            f'--config.init_from={pre}', '--config.num_epochs=1', '--config.batch_size=16',
            '--config.seq_len=16']
    assert launch.main(['finetune', '--workdir', str(tmp_path / 'bert_head'), *args]) == 0
    capsys.readouterr()
    assert launch.main(['export', '--workdir', str(tmp_path / 'bert_head'), '--output',
                        str(out)]) == 2
    assert '--config.model.classifier_head=modernbert to export' in capsys.readouterr().err
    assert launch.main(['finetune', '--workdir', str(ft), *args,
                        '--config.model.classifier_head=modernbert']) == 0
    capsys.readouterr()
    assert launch.main(['export', '--workdir', str(ft), '--output', str(out)]) == 0
    stdout = capsys.readouterr().out
    assert 'exported ModernBertForSequenceClassification' in stdout
    line = next(x for x in stdout.splitlines() if x.startswith('max |logit diff|: '))
    assert float(line.split()[3]) <= 1e-4, stdout
