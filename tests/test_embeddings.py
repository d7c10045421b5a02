"""Sentence embeddings: InfoNCE, global in-batch negatives on 8 devices, retrieval metrics,
the embedding run end to end, `launch.py embed`, and the sentence-transformers export."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune import contrastive, embed_data, retrieval_metrics
from models.config import model_config
from models.embedding import BertForSentenceEmbedding
from tests.helpers import NOUNS, launch, sentence
from text import wiki_pairs


def test_info_nce_matches_a_hand_computed_cross_entropy():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    p = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
        p / np.linalg.norm(p, axis=1, keepdims=True)).T
    logits = cos / 0.1
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    forward = -np.diag(log_softmax)
    log_softmax_t = logits.T - np.log(np.exp(logits.T).sum(1, keepdims=True))
    losses, correct = contrastive.info_nce(jnp.asarray(a), jnp.asarray(p), 0.1)
    np.testing.assert_allclose(losses, forward, rtol=1e-5)
    np.testing.assert_array_equal(correct, [1, 0, 0])  # anchor 1 is closest to positive 2
    sym, _ = contrastive.info_nce(jnp.asarray(a), jnp.asarray(p), 0.1, symmetric=True)
    np.testing.assert_allclose(sym, (forward - np.diag(log_softmax_t)) / 2, rtol=1e-5)


def test_retrieval_metrics_match_hand_computed_ranks():
    scores = np.array([[0.9, 0.1, 0.5],    # relevant 0: rank 1
                       [0.9, 0.1, 0.5],    # relevant 2: rank 2
                       [0.2, 0.2, 0.2]])   # relevant 1, all tied: rank 3 (ties against)
    ranks = retrieval_metrics.ranks_of_relevant(scores, np.array([0, 2, 1]))
    np.testing.assert_array_equal(ranks, [1, 2, 3])
    m = retrieval_metrics.metrics_from_ranks(np.array([1, 2, 3, 11]))
    assert m['recall@1'] == 0.25 and m['recall@5'] == 0.75 and m['recall@10'] == 0.75
    assert m['mrr@10'] == pytest.approx((1 + 1 / 2 + 1 / 3 + 0) / 4)
    assert m['ndcg@10'] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 4)
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    d = np.array([[0.0, 3.0], [2.0, 0.1]])  # cosine, not dot product: scale is ignored
    assert retrieval_metrics.retrieval_metrics(q, d, np.array([1, 0]))['recall@1'] == 1.0


def test_retrieval_metrics_agree_with_sklearn():
    """MRR with ties against the query is sklearn's label ranking average precision for one
    relevant document; nDCG@10 is sklearn's ndcg_score (no ties: its tie averaging is moot)."""
    metrics = pytest.importorskip('sklearn.metrics')
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 8))
    scores[:5] = np.round(scores[:5])  # some ties
    relevant = rng.integers(0, 8, size=50)
    onehot = np.eye(8)[relevant]
    ours = retrieval_metrics.metrics_from_ranks(
        retrieval_metrics.ranks_of_relevant(scores, relevant))
    assert ours['mrr@10'] == pytest.approx(
        metrics.label_ranking_average_precision_score(onehot, scores))
    untied = retrieval_metrics.metrics_from_ranks(
        retrieval_metrics.ranks_of_relevant(scores[5:], relevant[5:]))
    assert untied['ndcg@10'] == pytest.approx(metrics.ndcg_score(onehot[5:], scores[5:], k=10))


def test_dedupe_rows_and_knn():
    first, ids = retrieval_metrics.dedupe_rows(np.array([[3, 4], [1, 2], [3, 4], [5, 6]]))
    np.testing.assert_array_equal(first, [0, 1, 3])
    np.testing.assert_array_equal(ids, [0, 1, 0, 2])
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    accuracy = retrieval_metrics.knn_accuracy(train, np.array([0, 0, 1]),
                                              np.array([[1.0, 0.05], [0.1, 1.0]]),
                                              np.array([0, 1]), k=1)
    assert accuracy == 1.0
    # Query [1, 0]: one class-1 neighbour at cosine 0.9, two class-0 ones at 0.6 each. k=1
    # follows the nearest; k=3 sums the similarities: 1.2 for class 0 against 0.9.
    train = np.array([[0.9, math.sqrt(1 - 0.81)], [0.6, 0.8], [0.6, -0.8]])
    labels, query = np.array([1, 0, 0]), np.array([[1.0, 0.0]])
    assert retrieval_metrics.knn_accuracy(train, labels, query, np.array([1]), k=1) == 1.0
    assert retrieval_metrics.knn_accuracy(train, labels, query, np.array([0]), k=3) == 1.0


def test_wikitext_section_pairs_parse_titles_sections_and_first_paragraphs():
    raw = ('\n = Lobster = \n\n Lobsters are crustaceans . \n\n = = Life @-@ cycle = = \n\n'
           ' = = = Eggs = = = \n\n Eggs hatch at night . \n Second paragraph . \n')
    assert wiki_pairs.section_pairs(raw) == [('Lobster', 'Lobsters are crustaceans.'),
                                            ('Lobster: Eggs', 'Eggs hatch at night.')]


def _tiny_embedder(dropout: float = 0.1):
    cfg = model_config({'vocab_size': 64, 'hidden_size': 32, 'num_layers': 1,
                        'num_heads': 2, 'intermediate_size': 64,
                        'max_position_embeddings': 16, 'dropout_rate': dropout,
                        'attention_dropout_rate': dropout, 'pooling': 'mean'})
    return BertForSentenceEmbedding(cfg)


def _pair_batch(rows: int, seq: int = 12) -> dict:
    rng = np.random.default_rng(0)
    batch = {}
    for prefix in ('', contrastive.POSITIVE):
        ids = rng.integers(5, 64, size=(rows, seq)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[::3, 8:] = 0  # some padded rows
        batch.update({prefix + 'input_ids': ids * mask, prefix + 'attention_mask': mask,
                      prefix + 'token_type_ids': np.zeros_like(ids)})
    return batch


@pytest.mark.slow
def test_in_batch_negatives_span_the_global_batch_on_8_devices():
    """The sharded step's loss over 8 fake devices is the single-device loss of the whole
    batch (every anchor sees all 16 positives), not the mean of 8 per-device losses."""
    import optax

    from engine import mesh as mesh_lib
    from engine.step import TrainState
    assert jax.device_count() == 8
    model = _tiny_embedder()
    batch = _pair_batch(16)
    params = model.init(jax.random.key(0), batch['input_ids'])['params']
    tx = optax.sgd(0.1)

    def run(mesh):
        step = contrastive.embedding_train_step(model=model, tx=tx, labels=None,
                                                schedule=lambda s: 0.1, seed=0,
                                                temperature=0.05, symmetric=False, mesh=mesh)
        rep = mesh_lib.replicated(mesh)
        state = jax.device_put(TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                          opt_state=tx.init(params)), rep)
        fn = jax.jit(step, in_shardings=(rep, mesh_lib.batch_sharding(mesh)))
        new, metrics = fn(state, mesh_lib.shard_batch(batch, mesh))
        return float(metrics['loss_sum']), jax.device_get(new.params)

    eight = mesh_lib.make_mesh((8,), ('data',))
    one = mesh_lib.make_mesh((1,), ('data',), devices=jax.devices()[:1])
    loss8, params8 = run(eight)
    loss1, params1 = run(one)
    assert loss8 == pytest.approx(loss1, rel=1e-5)
    for x, y in zip(jax.tree.leaves(params8), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    # What per-device negatives would give instead (2 rows each): a different, smaller loss.
    rng = jax.random.fold_in(jax.random.key(0), 0)
    shard_loss = jax.jit(lambda b: contrastive.loss_terms(
        model, params, b, rng, temperature=0.05, symmetric=False)[1]['loss_sum'])
    per_device = sum(float(shard_loss({k: v[i:i + 2] for k, v in batch.items()}))
                     for i in range(0, 16, 2))
    assert per_device < loss1 * 0.6


@pytest.mark.slow
def test_simcse_positives_differ_only_by_dropout():
    """Anchor = positive text: with dropout the two passes differ (a real objective), and
    without it every anchor matches its own positive exactly (its loss is the floor)."""
    batch = _pair_batch(4)
    for k in contrastive.SEQUENCE_KEYS:
        batch[contrastive.POSITIVE + k] = batch[k]
    rng = jax.random.key(1)
    for dropout, same in ((0.1, False), (0.0, True)):
        model = _tiny_embedder(dropout)
        params = model.init(jax.random.key(0), batch['input_ids'])['params']
        a, p = jax.jit(lambda b, m=model, w=params: [  # the two passes of the loss
            contrastive.embed_pass(m, w, b, prefix, deterministic=False,
                                   rng=jax.random.fold_in(rng, i))
            for i, prefix in enumerate(('', contrastive.POSITIVE))])(batch)
        assert np.allclose(a, p) == same


def test_pairs_with_empty_rows_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / 'pairs.jsonl'
    rows = [{'anchor': 'a b', 'positive': 'c d'}, {'anchor': ' ', 'positive': 'x'},
            {'anchor': 'e f', 'positive': ''}, {'anchor': 'g h', 'positive': 'i j'}]
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    with caplog.at_level('WARNING'):
        pairs = embed_data.read_pairs(str(path), 'anchor', 'positive')
    assert pairs == [('a b', 'c d'), ('g h', 'i j')]
    assert "skipped 2 row(s) with an empty 'anchor' or 'positive' (lines 2, 3)" in caplog.text
    assert embed_data.read_pairs(str(path), 'anchor', '')[0] == ('a b', 'a b')  # SimCSE


def write_pairs(root, n: int = 96, seed: int = 0) -> str:
    """A pairs CSV: a templated sentence and the same scene said another way."""
    rng = np.random.default_rng(seed)
    lines = ['anchor,positive']
    for _ in range(n):
        text, _ = sentence(rng)
        words = text.split()
        lines.append(f'{text},{words[1]} {words[2]} {words[3]} {rng.choice(NOUNS)}')
    (root / 'pairs.csv').write_text('\n'.join(lines) + '\n')
    return str(root / 'pairs.csv')


EMBED_ARGS = ['--config.num_epochs=2', '--config.batch_size=16', '--config.seq_len=32',
              '--config.log_every_steps=2', '--config.learning_rate=1e-3']


@pytest.fixture(scope='module')
def embedding_run(tmp_path_factory, pretrained_run):
    """A finished embedding run on the toy pairs, from the shared tiny pretrained run."""
    import launch
    root = tmp_path_factory.mktemp('embed')
    pairs = write_pairs(root)
    workdir = root / 'run'
    code = launch.main(['finetune', '--config', 'configs/finetune.py:embed', '--workdir',
                        str(workdir), f'--config.init_from={pretrained_run}',
                        f'--config.data.train_file={pairs}', *EMBED_ARGS])
    assert code == 0
    return workdir


@pytest.mark.slow
def test_embedding_run_trains_and_reports_retrieval(embedding_run):
    results = json.loads((embedding_run / 'results.json').read_text())
    assert results['metric'] == 'ndcg@10'
    val = results['validation']
    assert set(val) >= {'recall@1', 'recall@10', 'mrr@10', 'ndcg@10'}
    assert 0.0 <= val['recall@1'] <= val['recall@10'] <= 1.0
    metrics = [json.loads(line) for line in (embedding_run / 'metrics.jsonl').open()]
    losses = [m['loss'] for m in metrics if 'loss' in m]
    assert losses and all(math.isfinite(x) for x in losses)


@pytest.mark.slow
def test_embed_command_matches_the_run_and_pools_a_pretrained_run(
        embedding_run, pretrained_run, tmp_path):
    """`launch.py embed` writes .npy + ids (and JSONL) equal to the model applied directly;
    a pretraining workdir embeds by mean pooling; blank lines are skipped and counted."""
    from finetune import embed_cmd
    texts = tmp_path / 'in.txt'
    texts.write_text('the red cat sat on the tree .\n\nthe old dog ran near the river .\n'
                     'a bird\n')
    out = tmp_path / 'vectors.npy'
    proc = launch(embedding_run, ['--input', str(texts), '--output', str(out),
                                  '--batch-size', '8', '--mesh', '(4,2)'], devices=8,
                  command='embed')
    assert proc.returncode == 0, proc.stderr
    assert 'skipped 1 blank line' in proc.stdout
    vectors = np.load(out)
    assert vectors.shape[0] == 3
    assert (tmp_path / 'vectors.ids.txt').read_text().split() == ['1', '3', '4']
    model, params, _ = embed_cmd.load_encoder(embedding_run, None)
    inputs = embed_cmd.read_inputs(str(texts), 'text')
    from finetune import encoding
    from finetune.data import Examples
    from text.tokenizer import load_tokenizer
    tok = load_tokenizer(str(embedding_run / 'spm.model'))
    enc = encoding.encode(tok, Examples(inputs.texts, None, np.zeros(3, np.int32)), 32)
    direct = model.apply({'params': params}, enc['input_ids'],
                         attention_mask=enc['attention_mask'],
                         token_type_ids=enc['token_type_ids'])
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    jsonl = tmp_path / 'pre.jsonl'
    assert launch(pretrained_run, ['--input', str(texts), '--output', str(jsonl)],
                  command='embed').returncode == 0
    records = [json.loads(line) for line in jsonl.open()]
    assert [r['id'] for r in records] == ['1', '3', '4'] and records[2]['text'] == 'a bird'
    assert embed_cmd.load_encoder(pretrained_run, None)[0].config.pooling == 'mean'


@pytest.mark.parametrize('content,output,message', [
    ('\n \n', 'v.npy', 'has no text (empty or blank lines only)'),
    ('one\n', 'v.txt', 'must end in .npy'),
])
def test_embed_command_refuses_bad_input_in_one_line(tmp_path, content, output, message):
    """Refused before any run is read: the workdir need not exist."""
    pretrained_run = str(tmp_path / 'no_run')
    import launch as launch_module
    (tmp_path / 'in.txt').write_text(content)
    with pytest.raises(Exception) as info:
        from finetune import embed_cmd
        embed_cmd.run(pretrained_run, str(tmp_path / 'in.txt'), str(tmp_path / output))
    assert message in str(info.value)
    assert launch_module.main(['embed', '--workdir', pretrained_run, '--input',
                               str(tmp_path / 'in.txt'), '--output',
                               str(tmp_path / output)]) == 2


def test_embedding_config_refusals(tmp_path, capsys):
    import launch as launch_module
    pairs = write_pairs(tmp_path, n=8)
    base = ['finetune', '--config', 'configs/finetune.py:embed', '--workdir',
            str(tmp_path / 'w'), '--config.init_from=none',
            f'--config.data.train_file={pairs}']
    (tmp_path / 'empty.csv').write_text('anchor,positive\n ,x\ny,\n')
    for extra in (['--config.metric=f1'], ['--config.grad_accum_steps=2'],
                  ['--config.embedding.temperature=0'],
                  [f'--config.data.train_file={tmp_path / "empty.csv"}']):
        assert launch_module.main([*base, *extra]) == 2
    assert not (tmp_path / 'w').exists()
    err = capsys.readouterr().err.splitlines()
    assert [line.split(':')[0] for line in err if line.startswith('error')] == ['error'] * 4
    assert 'no examples in the file' in err[-1]


@pytest.mark.slow
def test_predict_refuses_an_embedding_run(embedding_run, tmp_path):
    import launch as launch_module
    (tmp_path / 'in.txt').write_text('a text\n')
    assert launch_module.main(['predict', '--workdir', str(embedding_run), '--input',
                               str(tmp_path / 'in.txt')]) == 2


def test_pair_batches_cut_both_sides_to_one_length_and_repeat_by_step():
    """Dynamic padding keeps the longer side whole (a long positive is not cut to its short
    anchor's bucket), and a step's batch is a function of (seed, step) (exact resume)."""
    from finetune.encoding import MIN_BUCKET
    n, seq = 8, 64
    enc = {}
    for prefix, length in (('', 5), (contrastive.POSITIVE, 40)):
        mask = (np.arange(seq) < length).astype(np.int32)[None].repeat(n, 0)
        enc.update({prefix + 'input_ids': mask * 7, prefix + 'attention_mask': mask,
                    prefix + 'token_type_ids': np.zeros_like(mask)})
    enc['labels'] = np.arange(n, dtype=np.int32)
    batches = contrastive.PairBatches(enc, 4, seed=3)
    batch = batches.batch(1)
    assert batch['input_ids'].shape == batch[contrastive.POSITIVE + 'input_ids'].shape == (4, 64)
    assert batch[contrastive.POSITIVE + 'attention_mask'].sum(1).tolist() == [40] * 4
    again = contrastive.PairBatches(enc, 4, seed=3).batch(1)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    enc[contrastive.POSITIVE + 'attention_mask'][:, 6:] = 0  # both short: one small bucket
    assert contrastive.PairBatches(enc, 4, seed=3).batch(0)['input_ids'].shape[1] == MIN_BUCKET


@pytest.mark.slow
def test_export_is_a_sentence_transformers_model_with_the_same_embeddings(embedding_run,
                                                                          tmp_path):
    """`launch.py export` of an embedding run: SentenceTransformer(DIR).encode (or, without
    sentence-transformers, transformers BertModel + the written pooling) gives this
    project's embeddings within 1e-4."""
    import launch as launch_module
    from convert import st_export, verify
    from finetune import embed_cmd, encoding
    from finetune.data import Examples
    from text.tokenizer import load_tokenizer
    out = tmp_path / 'st'
    assert launch_module.main(['export', '--workdir', str(embedding_run), '--output',
                               str(out)]) == 0
    modules = json.loads((out / 'modules.json').read_text())
    assert [m['type'].rsplit('.', 1)[1] for m in modules] == ['Transformer', 'Pooling']
    pooling = json.loads((out / '1_Pooling' / 'config.json').read_text())
    assert pooling['pooling_mode_mean_tokens'] and not pooling['pooling_mode_cls_token']
    assert json.loads((out / 'config.json').read_text())['architectures'] == ['BertModel']
    texts = ['the red cat sat on the tree .', 'blue dog', 'the quiet horse slept near the '
             'garden under the old tree .']
    model, params, _ = embed_cmd.load_encoder(embedding_run, None)
    tok = load_tokenizer(str(out / 'spm.model'))
    enc = encoding.encode(tok, Examples(texts, None, np.zeros(3, np.int32)), 32)
    batch = {k: enc[k] for k in ('input_ids', 'token_type_ids', 'attention_mask')}
    ours = st_export.our_embeddings(model.config, params, batch)
    np.testing.assert_allclose(st_export.hf_embeddings(out, batch), ours, atol=1e-4)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return
    theirs = SentenceTransformer(str(out), device='cpu').encode(texts)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert verify.transformers_available()
