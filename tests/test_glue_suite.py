"""The GLUE suite (configs/suite.py:glue) on a tiny local stand-in of TFDS glue.

The stand-in is a TFDS builder named Glue, with the real glue's configs, feature names,
label names and splits (a handful of examples each), prepared in array_record format
without TensorFlow, so that 'tfds:glue/cola' etc. resolve as on a machine where
`tfds build glue/cola` was run.
"""

import csv
import json
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import suite as suite_config
from engine.config_cli import load_config
from engine.errors import ConfigError
from finetune import data
from finetune.task import load_config_task
from studies import suite
from tests.helpers import REPO, make_sentences, small_tokenizer
from text import corpus

# name: (text features, label names (None: a float score), {split: examples}); -1 labels
# on the test splits, as GLUE's.
GLUE = {
    'cola': (('sentence',), ['unacceptable', 'acceptable'],
             {'train': 24, 'validation': 6, 'test': 3}),
    'mrpc': (('sentence1', 'sentence2'), ['not_equivalent', 'equivalent'],
             {'train': 24, 'validation': 6, 'test': 3}),
    'stsb': (('sentence1', 'sentence2'), None, {'train': 24, 'validation': 6, 'test': 3}),
    'mnli': (('premise', 'hypothesis'), ['entailment', 'neutral', 'contradiction'],
             {'train': 30, 'validation_matched': 6, 'validation_mismatched': 7,
              'test_matched': 3, 'test_mismatched': 3}),
}
SENTENCES = make_sentences(300)
TINY = ('num_epochs=1 batch_size=8 seq_len=16 learning_rate=2e-3 log_every_steps=10 '
        'model.num_layers=1 model.hidden_size=32 model.intermediate_size=64 '
        'model.num_heads=2')


def _label(name: str, split: str, i: int):
    names = GLUE[name][1]
    if split.startswith('test'):
        return -1.0 if names is None else -1
    return float(i % 6) if names is None else i % len(names)


class Glue(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Stands in for TFDS glue (version 2.0.0): its configs, features and splits."""

    VERSION = tfds.core.Version('2.0.0')
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in GLUE]
    code_path = None  # see pretrain.data.BertjaxTokenizedText.code_path

    def _info(self):
        columns, names, _ = GLUE[self.builder_config.name]
        label = (tfds.features.Scalar(np.float32) if names is None
                 else tfds.features.ClassLabel(names=names))
        features = {c: tfds.features.Text() for c in columns}
        features.update(label=label, idx=tfds.features.Scalar(np.int32))
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            features), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n)
                for split, n in GLUE[self.builder_config.name][2].items()}

    def _generate_examples(self, split, n):
        name = self.builder_config.name
        columns = GLUE[name][0]
        for i in range(n):
            # The first word names the split and the example, so tests can trace them.
            texts = {c: f'{split}{i} {SENTENCES[(7 * i + k) % 300]}'
                     for k, c in enumerate(columns)}
            yield i, {**texts, 'label': _label(name, split, i), 'idx': i}


@pytest.fixture(scope='module')
def glue_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp('tfds')
    with corpus.quiet_tfds():  # no progress bars
        for name in GLUE:
            Glue(config=name, data_dir=str(root)).download_and_prepare(
                file_format='array_record')
    return str(root)


@pytest.fixture
def glue(glue_dir, monkeypatch) -> str:
    monkeypatch.setattr('tensorflow_datasets.core.constants.DATA_DIR', glue_dir)
    monkeypatch.setenv('TFDS_DATA_DIR', glue_dir)  # for any worker process
    return glue_dir


def _glue(*items: str) -> ml_collections.ConfigDict:
    return suite_config.get_config(','.join(['glue', *items]))


def test_glue_config_tasks_metrics_and_headlines():
    c = _glue('init_from=/pre')
    assert set(c.tasks) == {'cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'mnli_m', 'mnli_mm',
                            'qnli', 'rte'}
    assert set(c.variants) == {'pretrained', 'scratch'} and tuple(c.seeds) == (0, 1, 2)
    assert c.task_table and set(c.metrics) >= {'accuracy', 'f1_binary', 'mcc', 'pearson'}
    expect = {  # task: (dataset, text_a, text_b, metric, test split)
        'cola': ('cola', 'sentence', '', 'mcc', 'validation'),
        'sst2': ('sst2', 'sentence', '', 'accuracy', 'validation'),
        'mrpc': ('mrpc', 'sentence1', 'sentence2', 'f1', 'validation'),
        'qqp': ('qqp', 'question1', 'question2', 'f1', 'validation'),
        'stsb': ('stsb', 'sentence1', 'sentence2', 'pearson', 'validation'),
        'mnli_m': ('mnli', 'premise', 'hypothesis', 'accuracy', 'validation_matched'),
        'mnli_mm': ('mnli', 'premise', 'hypothesis', 'accuracy', 'validation_mismatched'),
        'qnli': ('qnli', 'question', 'sentence', 'accuracy', 'validation'),
        'rte': ('rte', 'sentence1', 'sentence2', 'accuracy', 'validation'),
    }
    for task, (name, a, b, metric, test) in expect.items():
        run = suite.run_config(c, task, 'pretrained', 1)
        d = run.data
        assert (d.train_file, d.text_column, d.text_b_column, d.label_column) == (
            f'tfds:glue/{name}', a, b, 'label')
        assert (run.metric, d.test_file, d.validation_file) == (metric, test, 'none')
        assert run.task == ('regression' if task == 'stsb' else 'classification')
        assert (run.init_from, run.seed, run.learning_rate) == ('/pre', 1, 0.0)  # 0: auto
    assert dict(c.headline_metrics) == {'mrpc': 'f1_binary', 'qqp': 'f1_binary'}
    assert {t: suite.headline(c, t, suite.run_config(c, t, 'scratch', 0))
            for t in ('cola', 'mrpc', 'stsb', 'mnli_mm')} == {
        'cola': 'mcc', 'mrpc': 'f1_binary', 'stsb': 'pearson', 'mnli_mm': 'accuracy'}
    cli = load_config(f'{REPO}/configs/suite.py:glue')  # as launch.py loads it
    assert set(cli.tasks) == set(c.tasks)


def test_headline_metrics_are_checked_before_anything_runs():
    c = _glue()
    c.headline_metrics.nope = 'mcc'
    with pytest.raises(ConfigError, match='^headline_metrics.nope: no such task$'):
        suite.validate(c)
    c = _glue()
    c.headline_metrics.cola = 'f2'
    with pytest.raises(ConfigError, match="^headline_metrics.cola: unknown metric 'f2'$"):
        suite.validate(c)


def test_binary_f1_is_the_positive_class_f1():
    split = {'confusion_matrix': [[5, 1], [2, 4]]}  # tp 4, fp 1, fn 2
    assert suite.binary_f1(split) == {'f1_binary': pytest.approx(8 / 11)}
    assert suite.binary_f1({'confusion_matrix': [[3, 0], [0, 0]]}) == {'f1_binary': 0.0}
    assert suite.binary_f1({'confusion_matrix': np.eye(3).tolist()}) == {}
    assert suite.binary_f1({'pearson': 0.5}) == {}


def _ids(texts: list[str], split: str) -> list[int]:
    assert all(t.startswith(split) for t in texts)
    return [int(t.split()[0][len(split):]) for t in texts]


def test_load_task_per_glue_task(glue):
    c = _glue('init_from=/pre')
    tasks = {t: load_config_task(suite.run_config(c, t, 'scratch', 0))
             for t in ('cola', 'mrpc', 'stsb', 'mnli_m', 'mnli_mm')}
    assert tasks['cola']['label_names'] == ['unacceptable', 'acceptable']
    assert tasks['cola']['test'].text_b is None
    assert tasks['mrpc']['label_names'] == ['not_equivalent', 'equivalent']
    assert tasks['stsb']['label_names'] is None
    assert tasks['stsb']['test'].labels.dtype == np.float32
    assert tasks['mnli_m']['label_names'] == ['entailment', 'neutral', 'contradiction']
    for t, split in [('cola', 'validation'), ('mrpc', 'validation'), ('stsb', 'validation'),
                     ('mnli_m', 'validation_matched'), ('mnli_mm', 'validation_mismatched')]:
        task = tasks[t]
        name = 'mnli' if t.startswith('mnli') else t
        ids = _ids(task['test'].text_a, split)  # GLUE's validation split is the test set
        assert ids == list(range(GLUE[name][2][split]))
        assert task['test'].labels.tolist() == [_label(name, split, i) for i in ids]
        if task['test'].text_b is not None:
            assert _ids(task['test'].text_b, split) == ids
        # The checkpoint is chosen on 10% carved from train, never the test set.
        held = _ids(task['validation'].text_a, 'train')
        assert len(held) == round(0.1 * GLUE[name][2]['train'])
        assert sorted(held + _ids(task['train'].text_a, 'train')) == list(
            range(GLUE[name][2]['train']))
    assert 'tensorflow' not in sys.modules


def test_tfds_split_choice_defaults_and_errors(glue):
    task = data.load_task('tfds:glue/cola', text_column='sentence')  # defaults as before
    assert _ids(task['validation'].text_a, 'validation') == list(range(6))
    assert task['test'] is None  # GLUE's unlabelled test split: skipped
    mnli = {'text_column': 'premise', 'text_b_column': 'hypothesis'}
    task = data.load_task('tfds:glue/mnli', 'validation_matched', 'validation_mismatched',
                          **mnli)
    assert _ids(task['validation'].text_a, 'validation_matched') == list(range(6))
    assert _ids(task['test'].text_a, 'validation_mismatched') == list(range(7))
    with pytest.raises(ValueError, match=r"^test_file: TFDS dataset 'glue/mnli' has no split "
                                         r"'validation'; its splits are \['test_matched'"):
        data.load_task('tfds:glue/mnli', '', 'validation', **mnli)
    with pytest.raises(ValueError, match="^validation_file: TFDS dataset 'glue/cola' has no "
                                         "split 'dev.csv'"):
        data.load_task('tfds:glue/cola', 'dev.csv', '', text_column='sentence')
    with pytest.raises(ValueError, match=r"glue/cola\[test\], example 0: missing label"):
        data.load_task('tfds:glue/cola', 'none', 'test', text_column='sentence')
    assert 'tensorflow' not in sys.modules


@pytest.mark.slow
def test_glue_evaluate_end_to_end(glue, tmp_path, capsys):
    small_tokenizer(tmp_path)
    tok = tmp_path / 'spm.model'
    c = _glue()
    c.seeds = (0,)
    keep = ('cola', 'mrpc', 'stsb', 'mnli_m', 'mnli_mm')
    for t in c.tasks:
        c.tasks[t] = c.tasks[t] if t in keep else ''  # '' drops the task
    # The scratch variant only (no pretraining run), with a tiny model and tokenizer.
    c.variants = ml_collections.ConfigDict({'scratch': f'init_from=none tokenizer_model={tok} '
                                                       f'{TINY}'})
    suite.run(c, str(tmp_path / 'glue'))
    root = tmp_path / 'glue'
    runs = {r['task']: r for r in json.loads((root / 'runs.json').read_text())}
    assert set(runs) == set(keep)
    tests = {t: json.loads((root / t / 'scratch' / 'seed_0' / 'results.json').read_text()
                           )['test'] for t in keep}
    assert runs['cola']['score'] == pytest.approx(tests['cola']['mcc'])
    assert runs['stsb']['score'] == pytest.approx(tests['stsb']['pearson'])
    assert runs['mrpc']['score'] == pytest.approx(suite.binary_f1(tests['mrpc'])['f1_binary'])
    # MNLI: one training, scored on each validation split (6 matched, 7 mismatched).
    assert np.sum(tests['mnli_m']['confusion_matrix']) == 6
    assert np.sum(tests['mnli_mm']['confusion_matrix']) == 7
    assert runs['mnli_mm']['score'] == pytest.approx(tests['mnli_mm']['accuracy'])
    md = (root / 'results_tasks.md').read_text()
    for head in ('cola (mcc)', 'mrpc (f1_binary)', 'stsb (pearson)', 'mnli_m (accuracy)',
                 'mnli_mm (accuracy)', 'average'):
        assert head in md
    rows = {r['task']: r for r in csv.DictReader(open(root / 'results.csv'))}
    assert rows['stsb']['mcc_mean'] == 'nan' and rows['cola']['pearson_mean'] == 'nan'
    assert float(rows['stsb']['spearman_mean']) == pytest.approx(tests['stsb']['spearman'])
    assert 'tensorflow' not in sys.modules
