"""The masked-LM objective, apart from the network: which tokens to predict, and the loss.

Runs on device inside the jitted step, with static shapes: every sequence gets
`max_predictions` prediction slots, of which the first `n` are real (weight 1), where
n = round(mask_rate * real tokens), at least 1, as in BERT's data generator.
"""

import dataclasses

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
