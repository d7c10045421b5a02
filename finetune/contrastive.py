"""Contrastive fine-tuning of sentence embeddings (task=embedding): loss, steps, batches.

The loss is InfoNCE with in-batch negatives, as sentence-transformers'
MultipleNegativesRankingLoss: cosine similarities of every anchor with every positive of the
batch, divided by a temperature (MNRL's scale 20 = temperature 0.05), cross-entropy towards
each anchor's own positive. It is one-directional (anchor -> positives) like MNRL;
`embedding.symmetric=True` averages it with the positive -> anchors direction (as
MultipleNegativesSymmetricRankingLoss). Unsupervised SimCSE is the same loss with the
positive the anchor's own text: the two forward passes draw different dropout masks.

The negatives are the whole GLOBAL batch: the step runs on the global arrays (jit over the
mesh), and the positives' embeddings are constrained to be replicated before the
similarity matrix, which is an all-gather across the data-parallel devices. Gradient
accumulation would shrink the negatives to a micro-batch, so it is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine import mesh as mesh_lib
from engine import step as step_lib
from engine.errors import ConfigError
from finetune import encoding, retrieval_metrics
from finetune.data import Examples
from models.embedding import BertForSentenceEmbedding

DEFAULT_TEMPERATURE = 0.05  # sentence-transformers MNRL's scale 20
POSITIVE = 'positive_'  # prefix of the positives' encoded columns
SEQUENCE_KEYS = encoding.SEQUENCE_KEYS


def normalize(x: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def info_nce(anchors: jax.Array, positives: jax.Array, temperature: float,
             symmetric: bool = False) -> tuple[jax.Array, jax.Array]:
    """(per-anchor losses (B,), whether each anchor's best match is its positive (B,)):
    cross-entropy of cosine(anchor_i, positive_j) / temperature towards j = i."""
    scores = normalize(anchors) @ normalize(positives).T / temperature
    targets = jnp.arange(scores.shape[0])
    losses = optax.softmax_cross_entropy_with_integer_labels(scores, targets)
    if symmetric:
        losses = (losses + optax.softmax_cross_entropy_with_integer_labels(scores.T, targets)) / 2
    return losses, (scores.argmax(-1) == targets).astype(jnp.float32)


def embed_pass(model: BertForSentenceEmbedding, params: Any, batch: dict, prefix: str, *,
               deterministic: bool, rng: jax.Array | None = None) -> jax.Array:
    """(B, H) embeddings of the batch's anchor ('') or positive (POSITIVE) columns."""
    return model.apply({'params': params}, batch[prefix + 'input_ids'],
                       token_type_ids=batch[prefix + 'token_type_ids'],
                       attention_mask=batch[prefix + 'attention_mask'],
                       deterministic=deterministic,
                       rngs={'dropout': rng} if rng is not None else None)


def loss_terms(model, params, batch: dict, rng: jax.Array, *, temperature: float,
               symmetric: bool, gather: Callable[[jax.Array], jax.Array] = lambda x: x
               ) -> tuple[jax.Array, dict]:
    """(mean InfoNCE over the batch, summed terms); anchors and positives get their own
    dropout keys (SimCSE's two masks). `gather` makes the positives whole on every device."""
    anchors = embed_pass(model, params, batch, '', deterministic=False,
                         rng=jax.random.fold_in(rng, 0))
    positives = embed_pass(model, params, batch, POSITIVE, deterministic=False,
                           rng=jax.random.fold_in(rng, 1))
    losses, correct = info_nce(anchors, gather(positives), temperature, symmetric)
    n = jnp.float32(losses.shape[0])
    return losses.mean(), {'loss_sum': losses.sum(), 'correct_sum': correct.sum(),
                           'weight_sum': n}


def embedding_train_step(*, model: BertForSentenceEmbedding, tx: optax.GradientTransformation,
                         labels: Any, schedule: Callable, seed: int, temperature: float,
                         symmetric: bool, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """engine.step.train_step with the InfoNCE loss: (state, batch) -> (state, metrics).
    With `mesh`, the positives are replicated over it (the global in-batch negatives)."""
    gather = (lambda x: x) if mesh is None else functools.partial(
        jax.lax.with_sharding_constraint,
        shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def loss_fn(params, batch, rng):
        return loss_terms(model, params, batch, rng, temperature=temperature,
                          symmetric=symmetric, gather=gather)

    return functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                             seed=seed, labels=labels)


def embed_step(params: Any, batch: dict, *, model: BertForSentenceEmbedding) -> jax.Array:
    """Eval-mode embeddings (N, H) of a batch's anchor columns."""
    return embed_pass(model, params, batch, '', deterministic=True)


# ---------------------------------------------------------------- encoding and batches


def encode_pairs(tokenizer, examples: Examples, seq_len: int) -> dict[str, np.ndarray]:
    """Anchors (text_a) and positives (text_b) encoded apart, each [CLS] text [SEP]: the
    anchor columns as encoding.encode names them, the positives' with POSITIVE before."""
    anchors = encoding.encode(tokenizer, Examples(examples.text_a, None, examples.labels),
                              seq_len)
    positives = encoding.encode(tokenizer, Examples(examples.text_b, None, examples.labels),
                                seq_len)
    return {**anchors, **{POSITIVE + k: positives[k] for k in SEQUENCE_KEYS}}


def side(encoded: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The anchor ('') or positive (POSITIVE) columns, named as the anchors' are."""
    return {k: encoded[prefix + k] for k in SEQUENCE_KEYS}


class PairBatches(encoding.TaskBatches):
    """TaskBatches of pairs; with dynamic padding anchors and positives are cut to one
    length, the bucket of the longest text of either side in the global batch."""

    def __init__(self, encoded: dict[str, np.ndarray], global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, *,
                 dynamic_padding: bool = True):
        super().__init__(encoded, global_batch_size, seed, process_index, process_count,
                         dynamic_padding=dynamic_padding)
        if dynamic_padding:
            self._lengths = np.maximum(encoding.row_lengths(encoded),
                                       encoded[POSITIVE + 'attention_mask'].sum(axis=1))

    def batch(self, step: int) -> dict[str, np.ndarray]:
        batch = super().batch(step)  # the anchors cut to self.length(step)
        if self._lengths is None:
            return batch
        length = self.length(step)
        return {k: v[:, :length] if k.startswith(POSITIVE) else v for k, v in batch.items()}


def embed_encoded(embed_fn: Callable[[dict], np.ndarray], encoded: dict[str, np.ndarray],
                  batch_size: int, *, dynamic_padding: bool = True) -> np.ndarray:
    """(N, H) embeddings of every encoded row in order; `embed_fn(batch)` -> this
    process's (batch rows, H)."""
    outputs, weights = [], []
    for batch in encoding.eval_batches(encoded, batch_size, dynamic_padding=dynamic_padding):
        outputs.append(np.asarray(embed_fn({k: batch[k] for k in SEQUENCE_KEYS})))
        weights.append(batch['weights'])
    return np.concatenate(outputs)[np.concatenate(weights) > 0]


# ---------------------------------------------------------------- the run's settings


def settings(cfg) -> tuple[float, bool]:
    """(temperature, symmetric) of `cfg.embedding` (defaults where a config has no such
    section); one-line ConfigErrors for what cannot work with in-batch negatives."""
    section = cfg.get('embedding') or {}
    temperature = float(section.get('temperature', DEFAULT_TEMPERATURE))
    if cfg.metric not in retrieval_metrics.METRIC_DIRECTIONS:
        raise ConfigError(f'metric: task=embedding reports '
                          f'{sorted(retrieval_metrics.METRIC_DIRECTIONS)}, not {cfg.metric!r}')
    if not temperature > 0:
        raise ConfigError(f'embedding.temperature: must be > 0, got {temperature}')
    if cfg.get('grad_accum_steps', 1) != 1:
        raise ConfigError('grad_accum_steps: task=embedding needs 1 (micro-batches would '
                          'shrink the in-batch negatives)')
    if cfg.freeze == 'encoder':
        raise ConfigError('freeze: task=embedding has no head; freeze=encoder leaves '
                          'nothing to train')
    if cfg.get('distill') is not None and cfg.distill.teacher:
        raise ConfigError('distill.teacher: not supported with task=embedding')
    augment = cfg.get('augment')
    if augment is not None and any(float(augment[k]) for k in ('delete', 'swap', 'mask')):
        raise ConfigError('augment: not supported with task=embedding')
    return temperature, bool(section.get('symmetric', False))


def compile_steps(cfg, mesh, model, tx, labels, schedule, shardings):
    """The jitted InfoNCE train step (state donated) and embedding step."""
    temperature, symmetric = settings(cfg)
    batch = mesh_lib.batch_sharding(mesh)
    train = jax.jit(embedding_train_step(model=model, tx=tx, labels=labels, schedule=schedule,
                                         seed=cfg.seed, temperature=temperature,
                                         symmetric=symmetric, mesh=mesh),
                    in_shardings=(shardings, batch), out_shardings=(shardings, None),
                    donate_argnums=0)
    embed = jax.jit(functools.partial(embed_step, model=model),
                    in_shardings=(shardings.params, batch))
    return train, embed


def evaluate(cfg, mesh, embed_fn, params, encoded: dict[str, np.ndarray]) -> dict:
    """Retrieval metrics of one encoded split: each anchor queries the split's distinct
    positives (finetune/retrieval_metrics.py)."""
    lo, hi = mesh_lib.process_rows(cfg.batch_size, mesh)
    dynamic = bool(cfg.data.dynamic_padding)

    def embed(batch):
        local = {k: v[lo:hi] for k, v in batch.items()}
        return jax.device_get(embed_fn(params, mesh_lib.shard_batch(local, mesh)))

    first, relevant = retrieval_metrics.dedupe_rows(encoded[POSITIVE + 'input_ids'])
    documents = side({k: v[first] for k, v in encoded.items()}, POSITIVE)
    queries = embed_encoded(embed, side(encoded, ''), cfg.batch_size, dynamic_padding=dynamic)
    docs = embed_encoded(embed, documents, cfg.batch_size, dynamic_padding=dynamic)
    return retrieval_metrics.retrieval_metrics(queries, docs, relevant)
