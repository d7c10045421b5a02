"""Gradual unfreezing: phase arithmetic, labels per phase, and a run through launch.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import launch
from engine.checkpoint import read_params_numpy
from engine.step import FROZEN, TRAIN
from finetune import unfreeze
from models.bert import BertConfig, BertForSequenceClassification
from models.paths import path_of
from tests.helpers import REPO, write_toy_task


def test_segments_and_phases():
    # 2 layers: phases 0 (head), 1 (+layer_1), 2 (+layer_0), 3 (+embeddings).
    assert unfreeze.segments(0, 10, 3, 2) == [(0, 3), (1, 6), (2, 9), (3, 10)]
    assert unfreeze.segments(4, 10, 3, 2) == [(1, 6), (2, 9), (3, 10)]
    assert unfreeze.segments(0, 20, 3, 2) == [(0, 3), (1, 6), (2, 9), (3, 20)]
    assert unfreeze.segments(0, 10, 0, 2) == [(3, 10)]  # off: one segment, all trainable
    assert unfreeze.segments(10, 10, 3, 2) == []
    # A checkpoint at step 3 was made by phase 0; the step after it belongs to phase 1.
    assert unfreeze.phase_of_state(3, 3, 2) == 0 and unfreeze.phase_of_step(3, 3, 2) == 1
    assert unfreeze.phase_of_state(0, 3, 2) == 0 and unfreeze.phase_of_state(4, 3, 2) == 1


@pytest.fixture(scope='module')
def params():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))[
        'params']


def _group(path: str) -> str:
    """'classifier', 'pooler', 'embeddings' or 'layer_i'."""
    parts = path.split('/')
    if parts[0] != 'bert':
        return parts[0]
    return parts[2] if parts[1] == 'encoder' else parts[1]


def _trainable(labels) -> set[str]:
    return {_group(path_of(kp)) for kp, label in jax.tree_util.tree_flatten_with_path(labels)[0]
            if label == TRAIN}


def test_phase_labels_unfreeze_from_the_top(params):
    assert _trainable(unfreeze.phase_labels(params, 'none', 2, 0)) == {'classifier', 'pooler'}
    assert _trainable(unfreeze.phase_labels(params, 'none', 2, 1)) == {
        'classifier', 'pooler', 'layer_1'}
    assert _trainable(unfreeze.phase_labels(params, 'none', 2, 3)) == {
        'classifier', 'pooler', 'layer_0', 'layer_1', 'embeddings'}
    # What `freeze` freezes stays frozen in every phase.
    last = unfreeze.phase_labels(params, 'embeddings', 2, 3)
    assert 'embeddings' not in _trainable(last)
    assert set(jax.tree.leaves(last)) == {TRAIN, FROZEN}


def test_continue_schedule_moves_only_the_schedule_count():
    tx = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(lambda n: n * 1.0))
    state = unfreeze.continue_schedule(tx.init({'w': jnp.zeros(3)}), 7)
    assert int(state[0].count) == 0 and int(state[1].count) == 7
    _, state = tx.update({'w': jnp.ones(3)}, state)
    assert int(state[1].count) == 8


def _task_file(root) -> str:
    return write_toy_task(root, 180, seed=5)


@pytest.mark.slow
def test_gradual_unfreezing_end_to_end(tmp_path, pretrained_run, capsys):
    pre = pretrained_run
    pretrained = read_params_numpy(f'{pre}/checkpoints')

    def finetune(name: str, every: int) -> dict:
        argv = ['finetune', '--config', f'{REPO}/configs/finetune.py:custom', '--workdir',
                str(tmp_path / name), f'--config.init_from={pre}',
                f'--config.data.train_file={_task_file(tmp_path)}', '--config.num_epochs=1',
                '--config.batch_size=16', '--config.seq_len=16', '--config.learning_rate=1e-2',
                '--config.model.dropout_rate=0', '--config.model.attention_dropout_rate=0',
                f'--config.gradual_unfreeze_steps={every}']
        assert launch.main(argv) == 0
        return read_params_numpy(str(tmp_path / name / 'checkpoints'))

    head_only = finetune('head_only', 1000)  # 10 steps, never past phase 0
    for name, value in pretrained.items():
        if name.startswith('bert/embeddings') or name.startswith('bert/encoder'):
            np.testing.assert_array_equal(head_only[name], value, err_msg=name)

    capsys.readouterr()
    staged = finetune('staged', 3)  # 1 layer: head (3 steps), + layer_0 (3), + embeddings
    out = capsys.readouterr().out
    assert 'unfreezing phase 1: params:' in out and 'unfreezing phase 2: params:' in out
    for name in ('bert/encoder/layer_0/attention/self/query/kernel',
                 'bert/embeddings/word_embeddings/embedding'):
        assert not np.array_equal(staged[name], pretrained[name]), name
