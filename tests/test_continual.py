"""Continual pretraining (`--config.init_from`): exact loading, vocabulary resize, resume,
and the forgetting eval on the old held-out text."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

import launch
from engine.checkpoint import read_params_numpy
from pretrain import continual
from tests.helpers import make_sentences, tiny_args
from tests.helpers import read_metrics as metrics
from text.tokenizer import load_tokenizer


def continual_args(corpus: str, init_from: str, steps: int, *extra: str) -> list[str]:
    return tiny_args(corpus, steps, f'--config.init_from={init_from}', *extra)


@pytest.fixture(scope='module')
def new_text(tmp_path_factory) -> str:
    """Another domain: sentences of made-up words (tests/helpers.make_sentences)."""
    path = tmp_path_factory.mktemp('new_text') / 'new.txt'
    path.write_text('\n'.join(make_sentences(400, seed=1)) + '\n')
    return str(path)


@pytest.mark.slow
def test_same_tokenizer_loads_exactly_and_step0_old_eval_is_the_source_eval(
        tmp_path, corpus, pretrained_run, new_text):
    source_eval = [r for r in metrics(pretrained_run) if 'eval_loss' in r][-1]
    workdir = tmp_path / 'run'
    args = continual_args(new_text, pretrained_run, 2)
    assert launch.main(['pretrain', '--workdir', str(workdir), *args]) == 0
    step0 = metrics(workdir)[0]
    assert step0['step'] == 0
    # Same weights, same tokenizer, same held-out split, masking seed and devices: equal.
    assert step0['old_eval_loss'] == source_eval['eval_loss']
    assert step0['old_eval_mlm_accuracy'] == source_eval['eval_mlm_accuracy']
    assert step0['eval_loss'] != source_eval['eval_loss']  # the new text is other text
    assert 'old_eval_loss' in metrics(workdir)[-1] and metrics(workdir)[-1]['step'] == 2
    saved = json.loads((workdir / 'config.json').read_text())
    assert saved['model']['hidden_size'] == 32 and saved['model']['vocab_size'] == 128
    assert (workdir / 'spm.model').read_bytes() == (
        pathlib.Path(pretrained_run) / 'spm.model').read_bytes()


def _load(cfg_args: list[str], tokenizer_path: str):
    """continual.load_params on a (2, 4) mesh, as a run would call it; numpy by path."""
    from engine import mesh as mesh_lib
    from engine.config_cli import apply_overrides, load_config
    from engine.optim import OptimizerConfig, make_optimizer
    from models.bert import BertConfig, BertForMaskedLM
    from pretrain import steps
    cfg = load_config(cfg_args[1])
    apply_overrides(cfg, [a[len('--config.'):] for a in cfg_args[2:] if a.startswith('--config.')])
    cfg, src = continual.resolve(cfg)
    cfg.mesh.shape = (2, 4)
    mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    model = BertForMaskedLM(BertConfig(**cfg.model.to_dict()))
    tx = make_optimizer(OptimizerConfig.from_config(cfg.optimizer), cfg.num_train_steps)
    init = lambda: steps.init_state(jax.random.key(0), model, tx, cfg.seq_len)  # noqa: E731
    with mesh_lib.sharding_context(mesh, cfg.mesh.rules):
        abstract, shardings = mesh_lib.abstract_and_shardings(init, mesh, cfg.mesh.rules)
        params, line = continual.load_params(cfg, src, load_tokenizer(tokenizer_path),
                                             abstract.params, shardings.params, mesh)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {'/'.join(k.key for k in p): np.asarray(v) for p, v in flat}, line


def test_loaded_params_are_bit_identical(corpus, pretrained_run):
    loaded, line = _load(continual_args(corpus, pretrained_run, 2),
                         f'{pretrained_run}/spm.model')
    saved = read_params_numpy(f'{pretrained_run}/checkpoints')
    assert loaded.keys() == saved.keys() and 'loaded as saved' in line
    for key in saved:
        np.testing.assert_array_equal(loaded[key], saved[key], err_msg=key)


def test_resize_copies_shared_rows_and_initialises_the_rest(tmp_path, corpus, pretrained_run):
    from tests.helpers import small_tokenizer
    new_tok = small_tokenizer(tmp_path)  # 150 BPE pieces of made-up words
    old_tok = load_tokenizer(f'{pretrained_run}/spm.model')
    args = continual_args(corpus, pretrained_run, 2, '--config.continual.new_rows=mean',
                          f'--config.data.tokenizer_model={new_tok.path}')
    loaded, line = _load(args, new_tok.path)
    saved = read_params_numpy(f'{pretrained_run}/checkpoints')
    table, bias = saved['bert/embeddings/word_embeddings/embedding'], saved['cls/predictions/bias']
    new_table, new_bias = loaded['bert/embeddings/word_embeddings/embedding'], loaded[
        'cls/predictions/bias']
    assert new_table.shape == (150, 32) and new_bias.shape == (150,)
    old_ids = {old_tok.id_to_piece(i): i for i in range(old_tok.vocab_size)}
    shared = [i for i in range(150) if new_tok.id_to_piece(i) in old_ids]
    fresh = [i for i in range(150) if new_tok.id_to_piece(i) not in old_ids]
    assert len(shared) > 5 and len(fresh) > 50, (len(shared), len(fresh))
    assert f'{len(shared)} rows copied' in line
    for i in shared:  # bit-identical copies, found by piece string
        j = old_ids[new_tok.id_to_piece(i)]
        assert np.array_equal(new_table[i], table[j]) and new_bias[i] == bias[j]
    regular = slice(5, old_tok.vocab_size)  # 'mean': the mean of the old regular rows
    np.testing.assert_allclose(new_table[fresh], np.broadcast_to(
        table[regular].mean(0), (len(fresh), 32)), rtol=1e-6)
    np.testing.assert_allclose(new_bias[fresh], bias[regular].mean(), rtol=1e-6, atol=1e-7)
    for key in saved.keys() - {'bert/embeddings/word_embeddings/embedding',
                               'cls/predictions/bias'}:
        np.testing.assert_array_equal(loaded[key], saved[key], err_msg=key)


@pytest.mark.slow
def test_new_tokenizer_run_resumes_from_its_own_checkpoint(tmp_path, corpus, pretrained_run,
                                                           new_text, capsys):
    workdir = tmp_path / 'run'
    args = ['pretrain', '--workdir', str(workdir), *continual_args(
        new_text, pretrained_run, 4, '--config.continual.tokenizer=train',
        '--config.continual.vocab_size=150', '--config.checkpoint_every_steps=2',
        f'--config.continual.old_eval_files={corpus}')]  # old text as files: no data build
    assert launch.main(args) == 0
    assert "rows copied by piece, the rest 'subwords'" in capsys.readouterr().out
    final = read_params_numpy(str(workdir / 'checkpoints'))
    assert final['bert/embeddings/word_embeddings/embedding'].shape == (150, 32)
    assert load_tokenizer(str(workdir / 'spm.model')).vocab_size == 150
    records = metrics(workdir)
    assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)
    assert records[0]['step'] == 0 and np.isfinite(records[0]['old_eval_loss'])
    shutil.rmtree(workdir / 'checkpoints' / '4')  # as if stopped after step 2
    assert launch.main(args) == 0
    out = capsys.readouterr().out
    assert 'resuming from step 2' in out and 'init_from:' not in out
    resumed = read_params_numpy(str(workdir / 'checkpoints'))
    for key in final:  # continued from step 2 of this run, not re-initialised
        np.testing.assert_array_equal(resumed[key], final[key], err_msg=key)
    assert [r['step'] for r in metrics(workdir)] == [r['step'] for r in records]


def test_bad_init_from_is_one_line(tmp_path, corpus, pretrained_run, capsys):
    broken = tmp_path / 'broken'
    shutil.copytree(pretrained_run, broken, ignore=shutil.ignore_patterns('data'))
    config = json.loads((broken / 'config.json').read_text())
    config['model']['num_layers'] = 2
    (broken / 'config.json').write_text(json.dumps(config))
    cases = {
        str(tmp_path / 'nowhere'): ['init_from: no such directory'],
        pretrained_run: ['--config.seq_len=1024',
                         'seq_len: 1024 exceeds the max_position_embeddings (512) of init_from'],
        str(broken): ['init_from: its checkpoint does not fit its config.json model: '
                      'bert/encoder/layer_1/'],
    }
    for init_from, (*extra, message) in cases.items():
        workdir = tmp_path / 'never'
        code = launch.main(['pretrain', '--workdir', str(workdir),
                            *continual_args(corpus, init_from, 2, *extra)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f'error: {message}') and '\n' not in err, err
        assert not workdir.exists()


def test_pydocs_reads_docstrings_without_importing(tmp_path):
    from text import pydocs
    (tmp_path / 'pkg' / 'tests').mkdir(parents=True)
    (tmp_path / 'site-packages').mkdir()
    (tmp_path / 'mod.py').write_text(
        '"""Module  doc,\n   two lines."""\nraise SystemExit("never run")\n'
        'class A:\n    """Class doc."""\n    def f(self):\n        """Class doc."""\n')
    (tmp_path / 'pkg' / 'bad.py').write_text('print "python 2"\n')
    (tmp_path / 'pkg' / 'tests' / 'test_x.py').write_text('"""A test."""\n')
    (tmp_path / 'site-packages' / 'dep.py').write_text('"""A dependency."""\n')
    assert pydocs.read_documents(tmp_path) == ['Module doc, two lines.', 'Class doc.']
