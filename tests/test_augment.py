"""Fine-tuning augmentation (delete / swap / [MASK]) and few-shot subsets."""

import numpy as np
import pytest

from finetune import augment, data, encoding
from tests.test_finetune_e2e import task_files  # noqa: F401  (a fixture)
from text.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID


def _encoded(n: int = 40, length: int = 24) -> dict[str, np.ndarray]:
    """Pair rows: [CLS] a.. [SEP] b.. [SEP] [PAD].. with text ids >= 10 (unique per row)."""
    rng = np.random.default_rng(0)
    ids = np.full((n, length), PAD_ID, np.int32)
    types = np.zeros((n, length), np.int32)
    for r in range(n):
        la, lb = rng.integers(3, 9, 2)
        ids[r, :la + lb + 3] = [CLS_ID, *range(10, 10 + la), SEP_ID,
                                *range(50, 50 + lb), SEP_ID]
        types[r, la + 2:la + lb + 3] = 1
    return {'input_ids': ids, 'token_type_ids': types,
            'attention_mask': (ids != PAD_ID).astype(np.int32),
            'labels': np.arange(n, dtype=np.int32) % 2}


def _batches(**probs) -> augment.AugmentedBatches:
    return augment.AugmentedBatches(_encoded(), 8, seed=3, **probs)


def test_augmentation_is_a_pure_function_of_seed_and_step():
    batches = _batches(delete=0.2, swap=0.2, mask=0.2)
    np.testing.assert_array_equal(batches.batch(5)['input_ids'], _batches(
        delete=0.2, swap=0.2, mask=0.2).batch(5)['input_ids'])
    plain = encoding.TaskBatches(_encoded(), 8, seed=3)
    assert not np.array_equal(batches.batch(5)['input_ids'], plain.batch(5)['input_ids'])
    np.testing.assert_array_equal(batches.batch(5)['labels'], plain.batch(5)['labels'])


def test_swap_and_mask_keep_specials_and_segments():
    plain = encoding.TaskBatches(_encoded(), 8, seed=3).batch(2)
    for probs in ({'swap': 0.5}, {'mask': 0.5}):
        out = _batches(**probs).batch(2)
        ids = out['input_ids']
        special = np.isin(plain['input_ids'], (PAD_ID, CLS_ID, SEP_ID))
        np.testing.assert_array_equal(ids[special], plain['input_ids'][special])
        np.testing.assert_array_equal(out['token_type_ids'], plain['token_type_ids'])
        assert (ids != plain['input_ids']).sum() > 10
        for row, before, t in zip(ids, plain['input_ids'], plain['token_type_ids'], strict=True):
            for segment in (0, 1):
                text = (t == segment) & ~np.isin(before, (PAD_ID, CLS_ID, SEP_ID))
                if 'swap' in probs:  # a permutation within the segment
                    assert sorted(row[text]) == sorted(before[text])
                else:
                    assert np.all((row[text] == before[text]) | (row[text] == MASK_ID))


def test_delete_closes_up_rows_and_keeps_types_and_masks_consistent():
    plain = encoding.TaskBatches(_encoded(), 8, seed=3).batch(1)
    out = _batches(delete=0.3).batch(1)
    removed = 0
    for before, after, t_before, t_after in zip(plain['input_ids'], out['input_ids'],
                                                plain['token_type_ids'], out['token_type_ids'],
                                                strict=True):
        kept = after[after != PAD_ID]
        it = iter(zip(before, t_before, strict=True))  # `kept` is a subsequence of `before`
        assert all(any(tok == b for b, _ in it) for tok in kept)
        assert list(kept).count(SEP_ID) == 2 and kept[0] == CLS_ID
        second = (np.cumsum(kept == SEP_ID) - (kept == SEP_ID)) > 0  # after the first [SEP]
        np.testing.assert_array_equal(t_after[:kept.size], second)
        assert np.all(after[kept.size:] == PAD_ID) and np.all(t_after[kept.size:] == 0)
        removed += int((before != PAD_ID).sum()) - kept.size
    assert removed > 5
    np.testing.assert_array_equal(out['attention_mask'], out['input_ids'] != PAD_ID)


def test_task_batches_from_config_and_bad_probabilities():
    from configs.finetune import get_config
    cfg = get_config('custom')
    cfg.batch_size = 8
    assert type(augment.task_batches(cfg, _encoded(), 0, 1)) is encoding.TaskBatches
    cfg.augment.mask = 0.1
    assert isinstance(augment.task_batches(cfg, _encoded(), 0, 1), augment.AugmentedBatches)
    with pytest.raises(ValueError, match='augment.delete'):
        augment.AugmentedBatches(_encoded(), 8, 0, delete=1.0)


def test_few_shot_takes_k_per_class_with_a_fixed_seed():
    labels = np.array([0, 1, 2, 0, 0, 1, 2, 2, 2, 0, 1, 1, 0], np.int32)
    examples = data.Examples(text_a=[f't{i}' for i in range(13)], text_b=None, labels=labels)
    shot = augment.few_shot(examples, 2, seed=7)
    assert np.bincount(shot.labels).tolist() == [2, 2, 2]
    assert shot.text_a == sorted(shot.text_a, key=lambda t: int(t[1:]))  # original order
    assert augment.few_shot(examples, 2, seed=7).text_a == shot.text_a
    assert augment.few_shot(examples, 2, seed=8).text_a != shot.text_a
    assert len(augment.few_shot(examples, 10, seed=0).text_a) == 13


def test_few_shot_k_in_the_finetune_config(task_files):  # noqa: F811
    from configs.finetune import get_config
    from engine.errors import ConfigError
    from finetune import train
    cfg = get_config('custom')
    cfg.init_from, cfg.batch_size, cfg.data.few_shot_k = 'none', 8, 5
    for split in ('train', 'validation', 'test'):
        cfg.data[f'{split}_file'] = task_files[split]
    _, _, task = train.validate(cfg)
    assert np.bincount(task['train'].labels).tolist() == [5, 5]
    assert len(task['test'].text_a) == 96 and task['label_names'] == ['cool', 'warm']
    cfg.data.few_shot_k = -1
    with pytest.raises(ConfigError, match='few_shot_k: must be >= 1'):
        train.validate(cfg)
