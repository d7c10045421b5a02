"""Writes bert_defaults_reference.npz: init params and outputs of the model before issue 17.

Generated once from commit 609e5dc (before the architecture options existed); the options
test checks that the model at default options still reproduces it bit for bit. Run from the
repository root: `PYTHONPATH=. python tests/data/make_bert_defaults_reference.py`.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

from models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification  # noqa: E402

B, L, P = 2, 12, 3


def main() -> None:
    rng = np.random.default_rng(17)
    ids = rng.integers(0, 97, (B, L)).astype(np.int32)
    types = rng.integers(0, 2, (B, L)).astype(np.int32)
    pos = rng.integers(0, L, (B, P)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    mask[1, 9:] = 0
    seg = np.ones((B, L), np.int32)
    seg[0, 6:] = 2
    out = dict(ids=ids, types=types, positions=pos, mask=mask, segments=seg)
    for pre in (False, True):
        cfg = BertConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64, max_position_embeddings=16, num_labels=3,
                         pre_layer_norm=pre)
        tag = 'pre' if pre else 'post'
        mlm = BertForMaskedLM(cfg)
        v = nn.unbox(mlm.init(jax.random.key(0), ids, pos, types))
        for k, a in flatten_dict(v['params'], sep='/').items():
            out[f'{tag}/mlm_params/{k}'] = np.asarray(a)
        out[f'{tag}/mlm_logits'] = np.asarray(mlm.apply(v, ids, pos, types, mask, seg))
        clf = BertForSequenceClassification(cfg)
        v = nn.unbox(clf.init(jax.random.key(1), ids, types))
        out[f'{tag}/clf_logits'] = np.asarray(clf.apply(v, ids, types, mask))
        out[f'{tag}/clf_train_logits'] = np.asarray(clf.apply(
            v, ids, types, mask, deterministic=False, rngs={'dropout': jax.random.key(3)}))
    np.savez_compressed(os.path.join(os.path.dirname(__file__), 'bert_defaults_reference.npz'),
                        **out)


if __name__ == '__main__':
    main()
