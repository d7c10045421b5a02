"""The PyTorch reference for `pretrain.benchmark --compare-torch`: Hugging Face transformers'
`BertForMaskedLM` with the same dimensions, trained the way its users train it.

`labels` carry the original token at the masked positions and -100 elsewhere, the batch is
masked at the same rate with BERT's 80/10/10 rule, and each step is
`zero_grad(); model(...).loss.backward(); clip; step()` with `torch.optim.AdamW`.
Masking runs on the host before timing (a DataLoader collator would do it in a worker),
so the torch step is timed without it; the JAX step masks inside the jitted step.

torch and transformers are benchmark/test extras (requirements-test.txt), imported here only.
"""

import time

import ml_collections
import numpy as np

from pretrain.masking import NUM_SPECIAL
from text.tokenizer import MASK_ID


def masked_labels(input_ids: np.ndarray, cfg: ml_collections.ConfigDict, max_predictions: int,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted ids, labels with -100 off the masked positions), numpy, same count per row
    as pretrain/masking.py: round(mask_rate * real tokens), capped at max_predictions."""
    rng = np.random.default_rng(seed)
    ids, labels = input_ids.copy(), np.full_like(input_ids, -100)
    k = cfg.masking
    for row in range(ids.shape[0]):
        real = np.arange(1, ids.shape[1] - 1)  # [CLS] and [SEP] are never predicted
        count = int(min(max(round(k.mask_rate * len(real)), 1), max_predictions))
        chosen = rng.choice(real, count, replace=False)
        labels[row, chosen] = ids[row, chosen]
        u = rng.random(count)
        random_tokens = rng.integers(NUM_SPECIAL, cfg.model.vocab_size, count)
        ids[row, chosen] = np.where(
            u < k.mask_token_rate, MASK_ID,
            np.where(u < k.mask_token_rate + k.random_token_rate, random_tokens, ids[row, chosen]))
    return ids, labels


class TorchRunner:
    """Builds the HF model and optimizer; `run(num_steps)` returns seconds per step."""

    def __init__(self, cfg: ml_collections.ConfigDict, input_ids: np.ndarray,
                 max_predictions: int, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        torch.manual_seed(cfg.seed)
        m = cfg.model
        config = transformers.BertConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
            max_position_embeddings=m.max_position_embeddings,
            type_vocab_size=m.type_vocab_size, hidden_dropout_prob=m.dropout_rate,
            attention_probs_dropout_prob=m.attention_dropout_rate, layer_norm_eps=1e-12,
            hidden_act='gelu')
        self.model = transformers.BertForMaskedLM(config).train()
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.learning_rate,
                                           betas=(o.b1, o.b2), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.max_grad_norm = float(o.max_grad_norm)
        ids, labels = masked_labels(input_ids, cfg, max_predictions, cfg.seed)
        self.inputs = {'input_ids': torch.from_numpy(ids).long(),
                       'attention_mask': torch.ones(ids.shape, dtype=torch.long),
                       'labels': torch.from_numpy(labels).long()}
        self.torch, self.threads = torch, threads
        self.attention = self.model.config._attn_implementation
        self.versions = f'torch {torch.__version__}, transformers {transformers.__version__}'

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**self.inputs).loss
        loss.backward()
        if self.max_grad_norm:  # the same global-norm clipping as the JAX step
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return loss.detach()

    def run(self, num_steps: int) -> float:
        start = time.perf_counter()
        for _ in range(num_steps):
            self.step()
        return (time.perf_counter() - start) / num_steps
