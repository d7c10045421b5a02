"""Scanned and unrolled encoder layouts, and the conversion between them.

With `scan_layers`, the encoder's layers are one nn.scan: params['bert']['encoder']['layers']
holds every layer's parameters stacked on a leading axis of length num_layers. Unrolled,
they are 'layer_0' ... 'layer_{L-1}' (Hugging Face's encoder.layer.{i}). Export and
fine-tuning work on the unrolled layout (per-layer names drive freezing, layer-wise rates,
LoRA targets and the name map); these two functions convert either way.
"""

from typing import Any

import jax
import jax.numpy as jnp

SCANNED_NAME = 'layers'


def unstack_layers(encoder: dict[str, Any]) -> dict[str, Any]:
    """An encoder subtree with SCANNED_NAME -> the same with layer_0 ... layer_{L-1} (other
    entries, e.g. final_layer_norm, kept). Arrays stay of their kind (numpy or jax)."""
    if SCANNED_NAME not in encoder:
        return encoder
    stacked = encoder[SCANNED_NAME]
    count = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in encoder.items() if k != SCANNED_NAME}
    for i in range(count):
        out[f'layer_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def stack_layers(encoder: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `unstack_layers` (jax arrays)."""
    names = sorted((k for k in encoder if k.startswith('layer_')), key=lambda k: int(k[6:]))
    if not names:
        return encoder
    out = {k: v for k, v in encoder.items() if not k.startswith('layer_')}
    out[SCANNED_NAME] = jax.tree.map(lambda *xs: jnp.stack(xs), *(encoder[n] for n in names))
    return out
