"""Dynamic padding: a batch is cut to its global batch's longest row (a power-of-two bucket),
the same shape on every process; only padding is cut, and a fine-tuning run's metrics
(and `launch.py predict`'s probabilities) match those padded to seq_len."""

import json
import shutil

import numpy as np
import pytest

import launch
from finetune import encoding, predict
from tests.helpers import REPO, sentence, write_toy_task
from text.tokenizer import PAD_ID


def _encoded(lengths, seq_len: int = 64) -> dict[str, np.ndarray]:
    n = len(lengths)
    ids = np.full((n, seq_len), PAD_ID, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i, length in enumerate(lengths):
        ids[i, :length] = 5 + i
        mask[i, :length] = 1
    return {'input_ids': ids, 'token_type_ids': np.zeros_like(ids), 'attention_mask': mask,
            'labels': np.arange(n, dtype=np.int32)}


@pytest.mark.parametrize('longest, seq_len, expected', [
    (1, 128, 16), (16, 128, 16), (17, 128, 32), (33, 128, 64), (100, 128, 128),
    (128, 128, 128), (40, 48, 48), (3, 8, 8)])
def test_bucket_lengths(longest, seq_len, expected):
    assert encoding.bucket_length(longest, seq_len) == expected


def test_training_batches_cut_only_padding_and_agree_across_processes():
    rng = np.random.default_rng(0)
    encoded = _encoded(rng.integers(3, 40, size=37).tolist())
    full = encoding.TaskBatches(encoded, 8, seed=1, dynamic_padding=False)
    cut = encoding.TaskBatches(encoded, 8, seed=1)
    halves = [encoding.TaskBatches(encoded, 8, seed=1, process_index=i, process_count=2)
              for i in range(2)]
    shapes = set()
    for step in range(12):
        a, b = full.batch(step), cut.batch(step)
        length = b['input_ids'].shape[1]
        shapes.add(length)
        longest = int(a['attention_mask'].sum(1).max())
        assert length == encoding.bucket_length(longest, 64) and length >= longest
        for key in encoding.SEQUENCE_KEYS:
            np.testing.assert_array_equal(b[key], a[key][:, :length])
            assert not a['attention_mask'][:, length:].any()  # only padding was cut
        np.testing.assert_array_equal(b['labels'], a['labels'])
        parts = [h.batch(step) for h in halves]
        assert {p['input_ids'].shape[1] for p in parts} == {length}  # one shape everywhere
        np.testing.assert_array_equal(np.concatenate([p['input_ids'] for p in parts]),
                                      b['input_ids'])
    assert shapes <= {16, 32, 64}


def test_eval_batches_cut_per_batch_and_keep_weights():
    encoded = _encoded([3, 5, 20, 4, 2, 2, 60, 1, 9])
    batches = list(encoding.eval_batches(encoded, 4))
    assert [b['input_ids'].shape[1] for b in batches] == [32, 64, 16]
    assert [float(b['weights'].sum()) for b in batches] == [4, 4, 1]
    padded = list(encoding.eval_batches(encoded, 4, dynamic_padding=False))
    for b, p in zip(batches, padded, strict=True):
        np.testing.assert_array_equal(b['input_ids'], p['input_ids'][:, :b['input_ids'].shape[1]])


@pytest.mark.slow
def test_finetuning_metrics_match_padding_to_seq_len(tmp_path, pretrained_run):
    """Without dropout the cut columns change nothing but the work: same results."""
    train = write_toy_task(tmp_path, n=120)
    results = {}
    for dynamic in (True, False):
        workdir = tmp_path / f'ft_{dynamic}'
        assert launch.main([
            'finetune', '--workdir', str(workdir),
            '--config', f'{REPO}/configs/finetune.py:custom',
            f'--config.init_from={pretrained_run}', f'--config.data.train_file={train}',
            '--config.num_epochs=2', '--config.batch_size=16', '--config.seq_len=64',
            '--config.model.dropout_rate=0', '--config.model.attention_dropout_rate=0',
            f'--config.data.dynamic_padding={dynamic}']) == 0
        results[dynamic] = json.loads((workdir / 'results.json').read_text())
    cut, padded = results[True]['validation'], results[False]['validation']
    assert cut.keys() == padded.keys()
    for key, value in padded.items():  # scalars and the confusion matrix alike
        np.testing.assert_allclose(np.asarray(cut[key], float), np.asarray(value, float),
                                   atol=1e-4, err_msg=key)


LOGITS_FN = predict.logits_fn  # before any test wraps it


@pytest.fixture(scope='module')
def finetuned_run(tmp_path_factory, pretrained_run) -> str:
    root = tmp_path_factory.mktemp('dynamic_padding')
    workdir = root / 'ft'
    assert launch.main([
        'finetune', '--workdir', str(workdir), '--config', f'{REPO}/configs/finetune.py:custom',
        f'--config.init_from={pretrained_run}', f'--config.data.train_file={write_toy_task(root)}',
        '--config.num_epochs=1', '--config.batch_size=16', '--config.seq_len=64']) == 0
    return str(workdir)


def _predict(workdir, texts, out, monkeypatch) -> tuple[list[dict], list[int]]:
    """predict's records and the sequence length of each batch it ran."""
    lengths = []

    def spy(model):
        apply = LOGITS_FN(model)
        return lambda p, b: (lengths.append(b['input_ids'].shape[1]), apply(p, b))[1]

    monkeypatch.setattr(predict, 'logits_fn', spy)
    assert launch.main(['predict', '--workdir', str(workdir), '--input', str(texts),
                        '--output', str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()], lengths


@pytest.mark.slow
def test_predict_pads_to_buckets_with_the_probabilities_of_padding_to_seq_len(
        tmp_path, finetuned_run, monkeypatch):
    rng = np.random.default_rng(1)
    sentences = [sentence(rng)[0] for _ in range(155)]
    # Batches of 64 whose longest rows differ: one, two, then up to four sentences a row.
    texts = [' '.join(sentences[i:i + 1 + (i >= 64) + 2 * (i >= 128)]) for i in range(150)]
    (tmp_path / 'in.txt').write_text('\n'.join(texts) + '\n')
    padded_run = tmp_path / 'padded'  # the same run, its config saying dynamic_padding=false
    shutil.copytree(finetuned_run, padded_run)
    config = json.loads((padded_run / 'config.json').read_text())
    assert config['data']['dynamic_padding'] is True
    config['data']['dynamic_padding'] = False
    (padded_run / 'config.json').write_text(json.dumps(config))

    cut, cut_lengths = _predict(finetuned_run, tmp_path / 'in.txt', tmp_path / 'a.jsonl',
                                monkeypatch)
    full, full_lengths = _predict(padded_run, tmp_path / 'in.txt', tmp_path / 'b.jsonl',
                                  monkeypatch)
    assert full_lengths == [64, 64, 64]
    assert len(cut_lengths) == 3 and set(cut_lengths) <= {16, 32, 64}
    assert cut_lengths[0] < cut_lengths[1] and sum(cut_lengths) < sum(full_lengths)
    assert [r['text'] for r in cut] == texts
    assert [r['label'] for r in cut] == [r['label'] for r in full]
    for a, b in zip(cut, full, strict=True):
        assert a['probabilities'].keys() == b['probabilities'].keys()
        np.testing.assert_allclose(list(a['probabilities'].values()),
                                   list(b['probabilities'].values()), atol=1e-5)
