"""Knowledge distillation: the soft-target loss, the student's pretrained layers, the
teacher's logits, and a distilled run end to end."""

import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

import launch
from configs.finetune import get_config
from engine import mesh as mesh_lib
from engine.checkpoint import Checkpoints, read_params_numpy, read_state_numpy
from engine.config_cli import config_from_json, config_to_json
from engine.errors import ConfigError
from finetune import data, distill, encoding, predict, setup, steps, unfreeze
from models.bert import BertConfig, BertForMaskedLM
from tests.test_finetune_e2e import finetune_args, task_files  # noqa: F401  (a fixture)
from text.tokenizer import Tokenizer

DEEP_LAYERS = 4
SHORT = ('--config.num_epochs=1', '--config.data.max_train_examples=128')  # 8 steps


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_loss_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (6, 4)), rng.normal(0, 3, (6, 4))
    labels = rng.integers(0, 4, 6)
    t = 2.5
    p_teacher = np.exp(_np_log_softmax(teacher / t))
    kl = (p_teacher * (_np_log_softmax(teacher / t) - _np_log_softmax(student / t))).sum(-1)
    ce = -_np_log_softmax(student)[np.arange(6), labels]
    assert kl.min() > 0.01 and np.abs(t * t * kl - ce).min() > 0.01  # the terms differ

    def losses(alpha):
        return np.asarray(distill.distillation_losses(
            jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
            jnp.asarray(labels), t, alpha))
    np.testing.assert_allclose(losses(0.0), ce, rtol=1e-5)
    np.testing.assert_allclose(losses(1.0), t * t * kl, rtol=1e-5)
    np.testing.assert_allclose(losses(0.3), 0.3 * t * t * kl + 0.7 * ce, rtol=1e-5)
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)  # padding rows count for nothing
    student_logits = jnp.asarray(student, jnp.float32)
    terms = steps.loss_terms(student_logits, jnp.asarray(labels), jnp.asarray(weights),
                             'classification', distill.distillation_losses(
                                 student_logits, jnp.asarray(teacher, jnp.float32),
                                 jnp.asarray(labels), t, 0.3))
    np.testing.assert_allclose(float(terms['loss_sum']), (losses(0.3) * weights).sum(),
                               rtol=1e-5)
    assert float(terms['correct_sum']) == ((student.argmax(-1) == labels) * weights).sum()
    # A student that matches the teacher has zero soft loss and zero soft gradient.
    grad = jax.grad(lambda s: distill.distillation_losses(s, s + 7.0, labels, t, 1.0).sum())(
        jnp.asarray(teacher, jnp.float32))
    assert np.abs(np.asarray(grad)).max() < 1e-6


def test_layer_sources_are_distilberts_every_other_layer():
    assert distill.layer_sources(6, 12) == [0, 2, 4, 6, 8, 10]
    assert distill.layer_sources(2, DEEP_LAYERS) == [0, 2]
    assert distill.layer_sources(1, 2) == [0]
    assert distill.layer_sources(3, 3) == [0, 1, 2]


@pytest.fixture(scope='module')
def deep_pretrained(tmp_path_factory, pretrained_run) -> pathlib.Path:
    """A 4-layer 'pretraining workdir': pretrained_run's tokenizer and config with 4
    layers of random weights (distinct per layer), saved as a pretraining checkpoint."""
    source, root = pathlib.Path(pretrained_run), tmp_path_factory.mktemp('deep') / 'run'
    root.mkdir()
    shutil.copyfile(source / 'spm.model', root / 'spm.model')
    cfg = config_from_json((source / 'config.json').read_text())
    cfg.model.num_layers = DEEP_LAYERS
    (root / 'config.json').write_text(config_to_json(cfg))
    model = BertForMaskedLM(BertConfig(**cfg.model.to_dict()))
    ids = jnp.zeros((1, 8), jnp.int32)
    init = lambda: model.init(jax.random.key(1), ids, masked_positions=ids[:, :2])  # noqa: E731
    params = jax.jit(lambda: nn.unbox(init()['params']))()
    ckpts = Checkpoints(str(root / 'checkpoints'), keep=1, async_save=False)
    ckpts.save(1, {'params': params}, {})
    ckpts.close()
    return root


def _student_cfg(init_from, student_layers: int):
    cfg = get_config('custom')
    cfg.init_from, cfg.seq_len, cfg.batch_size = str(init_from), 16, 8
    cfg.mesh.shape = (2, 2, 2)  # data, fsdp, tensor: the renamed layers restore sharded
    cfg.distill.student_layers = student_layers
    return cfg


@pytest.mark.slow
def test_student_starts_from_every_other_pretrained_layer(deep_pretrained):
    cfg = _student_cfg(deep_pretrained, 2)
    mesh = mesh_lib.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    tokenizer = Tokenizer(str(deep_pretrained / 'spm.model'))
    built = setup.build(cfg, {'label_names': ['a', 'b']}, tokenizer)
    assert built.model_cfg.num_layers == 2
    phase = unfreeze.phase_of_state(0, 0, 2)
    state, *_ = setup.initial_state(cfg, mesh, built, 10, phase)
    student = jax.tree.map(np.asarray, state.params['bert'])
    pretrained = read_state_numpy(str(deep_pretrained / 'checkpoints'))['params']['bert']
    assert sorted(student['encoder']) == ['layer_0', 'layer_1']
    for mine, theirs in (('layer_0', 'layer_0'), ('layer_1', 'layer_2')):
        got, want = student['encoder'][mine], pretrained['encoder'][theirs]
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    layer_1, layer_2 = (jax.tree.leaves(pretrained['encoder'][n]) for n in ('layer_1', 'layer_2'))
    assert not all(np.array_equal(a, b) for a, b in zip(layer_1, layer_2, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(student['embeddings']), jax.tree.leaves(pretrained['embeddings']),
        strict=True))
    with pytest.raises(ConfigError, match='distill.student_layers: 5 is more than the 4'):
        setup.build(_student_cfg(deep_pretrained, 5), {'label_names': ['a', 'b']}, tokenizer)


def _check_the_logits_cache(cfg, encoded, task, computed, workdir) -> None:
    """Written once into the workdir; read back while teacher and examples are the same."""
    assert distill.with_teacher_logits(cfg, encoded, task['test'], workdir).keys() == \
        computed.keys()
    assert (workdir / distill.CACHE_FILENAME).exists()

    def never(*args):
        raise AssertionError('recomputed')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, 'teacher_logits', never)
        again = distill.with_teacher_logits(cfg, encoded, task['test'], workdir)
        np.testing.assert_array_equal(again['teacher_logits'], computed['teacher_logits'])
        test = task['test']
        other = data.Examples(test.text_a[:-1], test.text_b, test.labels[:-1])
        with pytest.raises(AssertionError, match='recomputed'):  # other examples: a miss
            distill.with_teacher_logits(cfg, encoded, other, workdir)


@pytest.fixture(scope='module')
def teacher(tmp_path_factory, deep_pretrained, task_files) -> pathlib.Path:  # noqa: F811
    """A fine-tuned teacher on the toy task: layers 0 and 2 of deep_pretrained (itself a
    student_layers run, without a teacher)."""
    workdir = tmp_path_factory.mktemp('teacher') / 'ft'
    args = finetune_args(deep_pretrained, task_files, *SHORT, '--config.distill.student_layers=2')
    assert launch.main(['finetune', '--workdir', str(workdir), *args]) == 0
    return workdir


@pytest.mark.slow
def test_teacher_logits_are_its_predictions_and_bad_teachers_are_errors(
        teacher, task_files, tmp_path):  # noqa: F811
    cfg = config_from_json((teacher / 'config.json').read_text())
    task = data.load_task(task_files['train'], task_files['validation'], task_files['test'])
    encoded = encoding.encode(Tokenizer(str(teacher / 'spm.model')), task['test'], cfg.seq_len)
    cfg.distill.teacher = str(teacher)
    with_logits = distill.with_teacher_logits(cfg, encoded, task['test'])
    assert set(with_logits) == set(encoded) | {'teacher_logits'}
    _, model, params, _ = predict.load_run(teacher)
    probs = predict.predict(model, params, encoded, 'classification')
    np.testing.assert_allclose(jax.nn.softmax(with_logits['teacher_logits']), probs, atol=1e-6)
    _check_the_logits_cache(cfg, encoded, task, with_logits, epath.Path(tmp_path))

    distill.check(cfg, task)  # fine as it is
    bad = [('teacher', str(tmp_path / 'nowhere'), 'no such directory'),
           ('teacher', str(tmp_path), 'has no config.json'),
           ('alpha', 1.5, 'distill.alpha'), ('temperature', 0.0, 'distill.temperature'),
           ('student_layers', 5, 'student_layers: 5 is more than the 4')]
    for key, value, message in bad:
        wrong = config_from_json(config_to_json(cfg))
        wrong.distill[key] = value
        with pytest.raises(ConfigError, match=message):
            distill.check(wrong, task)
    with pytest.raises(ConfigError, match=r"labels \['cool', 'warm'\], this run is"):
        distill.check(cfg, {**task, 'label_names': ['cool', 'hot', 'warm']})
    augmented = config_from_json(config_to_json(cfg))
    augmented.augment.swap = 0.1
    with pytest.raises(ConfigError, match='augment'):
        distill.check(augmented, task)
    regression = config_from_json(config_to_json(cfg))
    regression.task = 'regression'
    with pytest.raises(ConfigError, match='regression is not supported'):
        distill.check(regression, task)


@pytest.mark.slow
def test_distilled_one_layer_student_end_to_end(tmp_path, deep_pretrained, teacher,
                                                task_files):  # noqa: F811
    student = tmp_path / 'student'
    args = finetune_args(deep_pretrained, task_files, *SHORT,
                         f'--config.distill.teacher={teacher}', '--config.distill.alpha=0.7',
                         '--config.distill.student_layers=1')
    assert launch.main(['finetune', '--workdir', str(student), *args]) == 0
    results = json.loads((student / 'results.json').read_text())
    record, teacher_results = results['distill'], json.loads(
        (teacher / 'results.json').read_text())
    assert record['student_layers'] == 1 and record['teacher_layers'] == 2
    params = read_params_numpy(str(student / 'best'))
    assert {p.split('/')[2] for p in params if p.startswith('bert/encoder/')} == {'layer_0'}
    assert record['student_params'] == sum(v.size for v in params.values())
    teacher_params = read_params_numpy(str(teacher / 'best'))
    assert record['teacher_params'] == sum(v.size for v in teacher_params.values())
    assert record['student_params'] < record['teacher_params']
    assert record['teacher_results'] == {k: teacher_results[k] for k in ('validation', 'test')}
    assert record['alpha'] == 0.7 and record['speed_split'] == 'test'
    assert record['speed_examples'] == 96
    assert record['student_examples_per_sec'] > 0 and record['teacher_examples_per_sec'] > 0
    assert json.loads((student / 'model.json').read_text())['num_layers'] == 1
    assert (student / distill.CACHE_FILENAME).is_file()  # the teacher's logits, for a resume
    assert set(results['test']) >= {'accuracy', 'f1'}
