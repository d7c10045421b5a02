"""Pseudo-labelling (`launch.py pseudolabel`): selection, the rest pool, rounds, resume."""

import json

import numpy as np
import pytest

import launch
from finetune import data, predict
from studies import pseudolabel
from tests.helpers import REPO, write_toy_task

PROBS = np.array([[0.95, 0.05, 0.0], [0.6, 0.4, 0.0], [0.1, 0.9, 0.0], [0.2, 0.8, 0.0],
                  [0.97, 0.03, 0.0], [0.05, 0.95, 0.0], [0.03, 0.97, 0.0], [0.0, 0.05, 0.95]])


def test_select_threshold_and_per_class_cap():
    assert pseudolabel.select(PROBS, 0.9).tolist() == [0, 2, 4, 5, 6, 7]  # >= threshold
    assert pseudolabel.select(PROBS, 0.96).tolist() == [4, 6]
    assert pseudolabel.select(PROBS, 0.0).tolist() == list(range(8))
    assert pseudolabel.select(PROBS, 0.99).tolist() == []
    # the most confident per predicted class: class 0 -> row 4, class 1 -> rows 6, 5
    assert pseudolabel.select(PROBS, 0.9, max_per_class=1).tolist() == [4, 6, 7]
    assert pseudolabel.select(PROBS, 0.9, max_per_class=2).tolist() == [0, 4, 5, 6, 7]
    assert pseudolabel.select(PROBS, 0.0, max_per_class=2).tolist() == [0, 4, 5, 6, 7]
    ties = np.array([[0.9, 0.1], [0.8, 0.2], [0.9, 0.1], [0.9, 0.1]])
    assert pseudolabel.select(ties, 0.5, max_per_class=2).tolist() == [0, 2]  # earlier rows


def _argv(tmp_path, pre, *extra):
    task = (f'custom data.train_file={tmp_path / "task.csv"} data.max_train_examples=120 '
            'num_epochs=4 batch_size=16 seq_len=16 learning_rate=1e-2 model.dropout_rate=0 '
            'model.attention_dropout_rate=0 log_every_steps=100')
    return ['pseudolabel', '--config', f'{REPO}/configs/pseudolabel.py:custom', '--workdir',
            str(tmp_path / 'pl'), f'--config.init_from={pre}', f'--config.task={task}',
            '--config.unlabeled_file=rest',
            '--config.threshold=0.6', '--config.max_pseudo_per_class=50', *extra]


def test_bad_configs_are_one_line_errors(tmp_path, pretrained_run, capsys):
    write_toy_task(tmp_path, 400, seed=3)
    (tmp_path / 'pool.csv').write_text('sentence\nthe red cat sat on the tree .\n')
    cases = [(['--config.threshold=1.0'], 'threshold: must be in [0, 1)'),
             (['--config.unlabeled_file=/no/pool.csv'], "no such file '/no/pool.csv'"),
             ([f'--config.unlabeled_file={tmp_path / "pool.csv"}'], "no column 'text'"),
             ([f'--config.unlabeled_file={tmp_path / "task.csv"}', '--config.gold_column=y'],
              "no column 'y'"),
             (['--config.task=custom task=regression'], 'needs a classification task'),
             (['--config.retrain=num_epochz=2'], 'retrain: '),
             (['--config.task=custom data.train_file=' + str(tmp_path / 'task.csv')],
              'keeps all its training labels')]
    for extra, message in cases:
        assert launch.main(_argv(tmp_path, pretrained_run, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count('\n') == 1, (extra, err)
    assert not (tmp_path / 'pl').exists()


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_pseudolabel_end_to_end_and_resume(tmp_path, pretrained_run, capsys):
    write_toy_task(tmp_path, 400, seed=3)
    root = tmp_path / 'pl'
    assert launch.main(_argv(tmp_path, pretrained_run)) == 0
    # The pool is exactly the training rows outside the labelled 120.
    full = data.load_task(str(tmp_path / 'task.csv'))['train']
    labelled = data.load_task(str(tmp_path / 'task.csv'), max_train_examples=120)['train']
    pool = _jsonl(root / 'pool.jsonl')
    assert len(pool) == len(full) - 120 == 240
    assert sorted([r['text'] for r in pool] + labelled.text_a) == sorted(full.text_a)
    # Accepted: round 0's pool predictions at or above the threshold, the 50 most confident
    # of each predicted class.
    predict.run(str(root / 'round_0'), str(root / 'pool.jsonl'), str(tmp_path / 'p.jsonl'))
    pseudo = _jsonl(root / 'round_1' / 'pseudo.jsonl')
    assert 0 < len(pseudo) <= 100
    texts = {p['text'] for p in pseudo}
    for label in ('cool', 'warm'):
        confident = [(max(p['probabilities'].values()), p['text'])
                     for p in _jsonl(tmp_path / 'p.jsonl')
                     if p['label'] == label and p['probabilities'][label] >= 0.6]
        taken = [c for c, t in confident if t in texts]
        assert len(taken) == min(50, len(confident))
        assert min(taken, default=1) >= max([c for c, t in confident if t not in texts],
                                            default=0) - 1e-6  # the most confident ones
    assert all(p['confidence'] >= 0.6 for p in pseudo)
    assert [p['label'] for p in pseudo] == [
        p['label'] for p in _jsonl(tmp_path / 'p.jsonl') if p['text'] in texts]
    train = _jsonl(root / 'round_1' / 'train.jsonl')
    assert len(train) == 120 + len(pseudo)
    stats = json.loads((root / 'round_1' / 'pseudo_stats.json').read_text())
    right = np.mean([p['label'] == p['gold_label'] for p in pseudo])
    assert stats['accepted'] == len(pseudo) and stats['precision'] == pytest.approx(right)
    results = json.loads((root / 'results.json').read_text())
    assert [(r['round'], r['train_examples']) for r in results] == [(0, 120),
                                                                    (1, 120 + len(pseudo))]
    # Round 1 scored on the same validation examples as round 0.
    for r in (0, 1):
        run = json.loads((root / f'round_{r}' / 'results.json').read_text())
        assert sum(map(sum, run['validation']['confusion_matrix'])) == 40
    assert f'| 1 | {120 + len(pseudo)} | {len(pseudo)} of 240 |' in (root / 'results.md'
                                                                    ).read_text()
    mtime = (root / 'round_1' / 'train.jsonl').stat().st_mtime_ns
    capsys.readouterr()
    assert launch.main(_argv(tmp_path, pretrained_run)) == 0  # resume: nothing retrains
    out = capsys.readouterr().out
    assert out.count('this run is complete') == 2 and 'labelling' not in out
    assert (root / 'round_1' / 'train.jsonl').stat().st_mtime_ns == mtime
    assert json.loads((root / 'results.json').read_text()) == results
