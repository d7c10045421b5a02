"""The masked-LM objective, apart from the network: which tokens to predict, and the loss.

Runs on device inside the jitted step, with static shapes: every sequence gets
`max_predictions` prediction slots, of which the first `n` are real (weight 1), where
n = round(mask_rate * real tokens), at least 1, as in BERT's data generator.

Span masking (`span_length` > 0, SpanBERT-style) chooses the same budget of tokens as
contiguous spans instead of independent tokens; see `span_positions`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from text.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID

NUM_SPECIAL = 5  # ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK]; random replacements avoid them


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    vocab_size: int  # tokenizer vocabulary (random replacements are drawn below it)
    max_predictions: int
    mask_rate: float = 0.15
    mask_token_rate: float = 0.8
    random_token_rate: float = 0.1
    whole_word: bool = False
    span_length: float = 0.0  # mean span length; 0 = independent tokens (BERT)


def _word_scores(rng: jax.Array, input_ids: jax.Array, candidates: jax.Array,
                 word_starts: jax.Array) -> jax.Array:
    """One random score per word, shared by all its pieces (so words are chosen whole)."""
    starts = word_starts[input_ids] | ~candidates
    word_ids = jnp.cumsum(starts, axis=-1)  # 1.. per row
    per_word = jax.random.uniform(rng, (input_ids.shape[0], input_ids.shape[1] + 1))
    return jnp.take_along_axis(per_word, word_ids, axis=-1), word_ids


def _drop_partial_words(weights, positions, word_ids):
    """Zeroes the weight of slots whose word was cut by the prediction budget."""
    num_segments = word_ids.shape[1] + 1

    def per_row(w, pos, wid):
        chosen_word = wid[pos]
        chosen = jax.ops.segment_sum(w, chosen_word, num_segments)
        length = jax.ops.segment_sum(jnp.ones_like(wid, jnp.float32), wid, num_segments)
        return w * (chosen[chosen_word] == length[chosen_word])
    return jax.vmap(per_row)(weights, positions, word_ids)


def choose_positions(rng: jax.Array, input_ids: jax.Array, cfg: MaskingConfig,
                     word_starts: jax.Array | None = None):
    """Returns (positions (B,P) int32, weights (B,P) float32) of the tokens to predict."""
    candidates = (input_ids != PAD_ID) & (input_ids != CLS_ID) & (input_ids != SEP_ID)
    num_real = candidates.sum(-1)
    budget = jnp.clip(jnp.round(num_real * cfg.mask_rate), 1, cfg.max_predictions)
    budget = jnp.where(num_real > 0, budget, 0).astype(jnp.int32)
    if cfg.span_length > 0:
        return span_positions(rng, candidates, budget, cfg)
    if cfg.whole_word:
        scores, word_ids = _word_scores(rng, input_ids, candidates, word_starts)
        # Pieces of one word share a score; a small position term keeps them adjacent.
        scores = scores - 1e-6 * jnp.arange(input_ids.shape[1]) / input_ids.shape[1]
    else:
        scores = jax.random.uniform(rng, input_ids.shape)
    scores = jnp.where(candidates, scores, -1.0)  # specials and padding are never picked
    _, positions = jax.lax.top_k(scores, cfg.max_predictions)
    weights = (jnp.arange(cfg.max_predictions) < budget[:, None]).astype(jnp.float32)
    if cfg.whole_word:
        weights = _drop_partial_words(weights, positions, word_ids)
    return positions.astype(jnp.int32), weights


def span_geometric_p(mean: float, max_length: int) -> float:
    """p of the geometric length distribution (support 1, 2, ...) that, clipped at
    `max_length`, has mean `mean`: E[min(G, M)] = (1 - (1 - p)^M) / p, solved by bisection."""
    if mean <= 1.0:
        return 1.0
    low, high = 1e-9, 1.0  # the clipped mean falls as p grows
    for _ in range(100):
        p = (low + high) / 2
        if (1 - (1 - p) ** max_length) / p > mean:
            low = p
        else:
            high = p
    return (low + high) / 2


def span_max_length(mean: float) -> int:
    """Spans are clipped at 3x their mean (SpanBERT: mean 3.8, clipped at 10)."""
    return max(1, math.ceil(3 * mean))


def span_positions(rng: jax.Array, candidates: jax.Array, budget: jax.Array,
                   cfg: MaskingConfig) -> tuple[jax.Array, jax.Array]:
    """Span masking: (positions, weights) as `choose_positions`, the chosen tokens forming
    contiguous spans inside runs of candidates (never across [CLS]/[SEP]/[PAD]).

    Span lengths are geometric, clipped at `span_max_length`, with p solved so the clipped
    mean is `span_length`. Spans are placed one at a time (max_predictions static rounds,
    one per possible span): a uniformly random start among those where the whole span fits
    in unmasked candidates, until the row's budget is spent; the last span is cut to the
    budget, and where fragmentation leaves no room for a span, the longest free run is
    taken. A span also blocks its two neighbours, so spans never touch: every masked run is
    exactly one span (at most half the tokens can be masked that way).
    """
    rows, length = candidates.shape
    max_len = span_max_length(cfg.span_length)
    p = span_geometric_p(cfg.span_length, max_len)
    length_rng, start_rng = jax.random.split(rng)
    lengths = jax.random.geometric(length_rng, p, (rows, cfg.max_predictions))
    lengths = jnp.clip(lengths, 1, max_len).astype(jnp.int32)
    index = jnp.arange(length)

    def place(k, carry):
        masked, blocked, remaining = carry
        free = candidates & ~blocked
        # Length of the free run starting at each position (0 where not free).
        next_taken = jax.lax.cummin(jnp.where(free, length, index[None, :]), axis=1,
                                    reverse=True)
        run = next_taken - index[None, :]
        span = jnp.minimum(jnp.minimum(lengths[:, k], remaining), run.max(axis=1))
        fits = free & (run >= span[:, None])
        scores = jnp.where(fits, jax.random.uniform(jax.random.fold_in(start_rng, k),
                                                    (rows, length)), -1.0)
        start = jnp.argmax(scores, axis=1)
        new = ((index[None, :] >= start[:, None]) & (index[None, :] < (start + span)[:, None])
               & (span[:, None] > 0))
        near = (new | jnp.pad(new[:, :-1], ((0, 0), (1, 0)))
                | jnp.pad(new[:, 1:], ((0, 0), (0, 1))))
        return masked | new, blocked | near, remaining - span

    zeros = jnp.zeros_like(candidates)
    masked, _, _ = jax.lax.fori_loop(0, cfg.max_predictions, place,
                                     (zeros, zeros, budget.astype(jnp.int32)))
    # The masked positions in ascending order, then unused slots (weight 0).
    order = jnp.where(masked, 2.0 - index / length, -1.0)
    _, positions = jax.lax.top_k(order, cfg.max_predictions)
    weights = (jnp.arange(cfg.max_predictions) < masked.sum(-1)[:, None]).astype(jnp.float32)
    return positions.astype(jnp.int32), weights


def mask_tokens(rng: jax.Array, input_ids: jax.Array, cfg: MaskingConfig,
                word_starts: jax.Array | None = None) -> dict[str, jax.Array]:
    """BERT masking: of the chosen tokens 80 % -> [MASK], 10 % -> random, 10 % unchanged.

    Returns the corrupted `input_ids` and `masked_positions`, `masked_labels` (the
    original tokens) and `masked_weights` (1 for real prediction slots).
    """
    choose_rng, kind_rng, random_rng = jax.random.split(rng, 3)
    positions, weights = choose_positions(choose_rng, input_ids, cfg, word_starts)
    labels = jnp.take_along_axis(input_ids, positions, axis=-1)
    u = jax.random.uniform(kind_rng, positions.shape)
    random_tokens = jax.random.randint(random_rng, positions.shape, NUM_SPECIAL, cfg.vocab_size)
    replacement = jnp.where(u < cfg.mask_token_rate, MASK_ID,
                            jnp.where(u < cfg.mask_token_rate + cfg.random_token_rate,
                                      random_tokens, labels))
    replacement = jnp.where(weights > 0, replacement, labels)  # unused slots change nothing
    rows = jnp.arange(input_ids.shape[0])[:, None]
    corrupted = input_ids.at[rows, positions].set(replacement.astype(input_ids.dtype))
    return {'input_ids': corrupted, 'masked_positions': positions,
            'masked_labels': labels * (weights > 0), 'masked_weights': weights}


def mlm_loss_terms(logits: jax.Array, labels: jax.Array,
                   weights: jax.Array) -> dict[str, jax.Array]:
    """Sums (not means) so micro-batches and devices can be added up exactly."""
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (logits.argmax(-1) == labels).astype(jnp.float32)
    return {'loss_sum': (losses * weights).sum(), 'correct_sum': (correct * weights).sum(),
            'weight_sum': weights.sum()}
