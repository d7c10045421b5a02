"""Hugging Face `datasets` as input ('hf:PATH[:split][:column]'): datasets built here with
`datasets` itself and saved with save_to_disk; pretraining and fine-tuning end to end."""

import json
import pathlib

import numpy as np
import pytest

import launch
from finetune import data
from tests.helpers import REPO, sentence, tiny_args
from text import hf_source

datasets = pytest.importorskip('datasets')


def corpus_lines(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [sentence(rng)[0] for _ in range(n)]


@pytest.fixture(scope='module')
def text_dataset(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(save_to_disk DatasetDict with train/validation splits and a 'body' column,
    the same train text as a .txt file)."""
    root = tmp_path_factory.mktemp('hf_text')
    train, validation = corpus_lines(1200, 0), corpus_lines(100, 1)
    datasets.DatasetDict({
        'train': datasets.Dataset.from_dict({'body': train, 'n': list(range(len(train)))}),
        'validation': datasets.Dataset.from_dict({'body': validation,
                                                  'n': list(range(len(validation)))}),
    }).save_to_disk(str(root / 'ds'))
    (root / 'train.txt').write_text('\n'.join(train) + '\n')
    return root / 'ds', root / 'train.txt'


def test_spec_parsing():
    assert hf_source.parse_spec('hf:/d') == hf_source.Spec('/d', '', 'text')
    assert hf_source.parse_spec('hf:/d:test') == hf_source.Spec('/d', 'test', 'text')
    assert hf_source.parse_spec('hf:/d::body') == hf_source.Spec('/d', '', 'body')
    assert hf_source.parse_spec('hf:org/name:train:body') == hf_source.Spec(
        'org/name', 'train', 'body')
    with pytest.raises(ValueError, match='give a dataset'):
        hf_source.parse_spec('hf:')


def test_a_split_reads_rows_by_index_and_fingerprints_its_files(text_dataset, tmp_path):
    ds_dir, _ = text_dataset
    split = hf_source.open_split(f'hf:{ds_dir}', 'validation', 'data.eval_files')
    assert len(split) == 100 and split.dataset_info.splits == ('train', 'validation')
    rows = split.__getitems__(range(3, 5))
    assert rows == [{'body': corpus_lines(100, 1)[i], 'n': i} for i in (3, 4)]
    assert split.__getitems__(range(7, 7)) == []
    own = hf_source.open_split(f'hf:{ds_dir}:train', 'validation', 'key')  # the spec's split
    assert len(own) == 1200
    # A changed dataset has another version, so its preparation is not reused.
    copy = tmp_path / 'copy'
    datasets.load_from_disk(str(ds_dir))['validation'].select(range(99)).save_to_disk(copy)
    other = hf_source.open_split(f'hf:{copy}', 'train', 'key')  # one Dataset: 'train'
    assert len(other) == 99 and other.dataset_info.version != split.dataset_info.version


def test_missing_dataset_and_split_are_one_line(text_dataset, tmp_path):
    ds_dir, _ = text_dataset
    with pytest.raises(ValueError, match=r"data.train_files: Hugging Face dataset .* has no "
                                         r"split 'test'; its splits are \['train', 'validation'\]"):
        hf_source.open_split(f'hf:{ds_dir}:test', 'train', 'data.train_files')
    with pytest.raises(ValueError, match=r"data.train_files: cannot open Hugging Face dataset "
                                         r"'no/such_dataset_xyz': neither a save_to_disk"):
        hf_source.open_split('hf:no/such_dataset_xyz', 'train', 'data.train_files')


def losses(workdir: pathlib.Path) -> list[float]:
    lines = (workdir / 'metrics.jsonl').read_text().splitlines()
    return [json.loads(line)['loss'] for line in lines if '"loss"' in line]


@pytest.mark.slow
def test_pretraining_on_a_dataset_trains_exactly_as_on_the_same_text_file(text_dataset,
                                                                           tmp_path, capsys):
    """The dataset's column goes through the same preparation as a text file holding the
    same lines: same tokenizer, same sequences, so the same losses step for step."""
    ds_dir, txt = text_dataset
    runs = {}
    for name, source in (('hf', f'hf:{ds_dir}::body'), ('txt', str(txt))):
        runs[name] = tmp_path / name
        assert launch.main(['pretrain', '--workdir', str(runs[name]),
                            *tiny_args(source, 6)]) == 0
    assert losses(runs['hf']) == losses(runs['txt']) and len(losses(runs['hf'])) == 3
    # The validation split as held-out text; the wrong column is one line.
    held = tmp_path / 'held'
    assert launch.main(['pretrain', '--workdir', str(held), *tiny_args(
        f'hf:{ds_dir}::body', 2, f'--config.data.eval_files=hf:{ds_dir}::body')]) == 0
    capsys.readouterr()
    assert launch.main(['pretrain', '--workdir', str(tmp_path / 'bad'),
                        *tiny_args(f'hf:{ds_dir}', 2)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no feature 'text'; it has ['body', 'n']" in err[0], err


@pytest.fixture(scope='module')
def labelled_dataset(tmp_path_factory) -> pathlib.Path:
    """A DatasetDict train/test whose 'label' is a ClassLabel in a non-sorted order."""
    root = tmp_path_factory.mktemp('hf_task')
    rng = np.random.default_rng(5)
    features = datasets.Features({'sentence': datasets.Value('string'),
                                  'label': datasets.ClassLabel(names=['warm', 'cool'])})
    splits = {}
    for split, n in (('train', 120), ('test', 40)):
        rows = [sentence(rng) for _ in range(n)]
        splits[split] = datasets.Dataset.from_dict(
            {'sentence': [t for t, _ in rows],
             'label': [0 if a in {'red', 'big', 'old', 'quiet'} else 1 for _, a in rows]},
            features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root / 'task'))
    return root / 'task'


def test_a_dataset_as_a_fine_tuning_task(labelled_dataset):
    spec = f'hf:{labelled_dataset}'
    task = data.load_task(spec, '', '', text_column='sentence', validation_fraction=0.25)
    assert task['label_names'] == ['warm', 'cool']  # the ClassLabel's order, not sorted
    assert (len(task['train']), len(task['validation']), len(task['test'])) == (90, 30, 40)
    for examples in (task['train'], task['test']):
        warm = [t.split()[1] in {'red', 'big', 'old', 'quiet'} for t in examples.text_a]
        assert examples.labels.tolist() == [0 if w else 1 for w in warm]
    with pytest.raises(ValueError, match=r"hf:.*\[train\]: no feature 'text'"):
        data.load_task(spec, '', '')
    with pytest.raises(ValueError, match=r"test_file: Hugging Face dataset .* has no split 'dev'"):
        data.load_task(spec, '', 'dev', text_column='sentence')


@pytest.mark.slow
def test_fine_tuning_on_a_dataset_end_to_end(labelled_dataset, pretrained_run, tmp_path):
    workdir = tmp_path / 'ft'
    assert launch.main([
        'finetune', '--workdir', str(workdir), '--config', f'{REPO}/configs/finetune.py:custom',
        f'--config.init_from={pretrained_run}', f'--config.data.train_file=hf:{labelled_dataset}',
        '--config.data.text_column=sentence', '--config.num_epochs=1', '--config.batch_size=16',
        '--config.seq_len=32']) == 0
    results = json.loads((workdir / 'results.json').read_text())
    assert {'validation', 'test'} <= results.keys()  # the dataset's own test split was used
    assert 0.0 <= results['test']['accuracy'] <= 1.0
    described = json.loads((workdir / 'task.json').read_text())
    assert described['label_names'] == ['warm', 'cool']
    predictions = tmp_path / 'p.jsonl'  # predict reads plain text, the dataset's text column
    (tmp_path / 'in.txt').write_text('the red cat sat on the tree .\n')
    assert launch.main(['predict', '--workdir', str(workdir), '--input', str(tmp_path / 'in.txt'),
                        '--output', str(predictions)]) == 0
    assert json.loads(predictions.read_text().splitlines()[0])['label'] in ('warm', 'cool')
