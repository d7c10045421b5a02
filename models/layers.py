"""Building blocks shared by the BERT modules: initialised Dense / Embed / LayerNorm with
logical axis names, the residual sub-layer wrapper and the feed-forward (plain or gated)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import peft
from models.config import BertConfig

Array = jax.Array
LogicalAxes = Sequence[str | None]


def kernel_init(config: BertConfig, axes: LogicalAxes) -> nn.initializers.Initializer:
    """Truncated normal at +-2 std like the original TF BERT initializer, with logical axes."""
    init = nn.initializers.truncated_normal(stddev=config.initializer_range)
    return nn.with_logical_partitioning(init, tuple(axes))


def dense(
    config: BertConfig,
    features: int,
    kernel_axes: LogicalAxes,
    name: str | None = None,
    use_bias: bool | None = None,
) -> nn.Dense:
    """Dense layer: compute in config dtype, params in param_dtype, zero bias named like the
    output.

    `use_bias` None follows `config.use_bias`; heads whose bias is kept pass True.
    """
    kwargs = dict(
        dtype=config.compute_dtype,
        param_dtype=config.weights_dtype,
        kernel_init=kernel_init(config, kernel_axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (kernel_axes[1],)),
        use_bias=config.use_bias if use_bias is None else use_bias,
        name=name,
    )
    if config.lora_rank:  # same params and maths, plus LoRA where lora_targets match its path
        return peft.LoraDense(features, config=config, kernel_axes=tuple(kernel_axes), **kwargs)
    return nn.Dense(features, **kwargs)


def embed(config: BertConfig, num: int, axes: LogicalAxes, name: str | None = None) -> nn.Embed:
    return nn.Embed(
        num,
        config.hidden_size,
        dtype=config.compute_dtype,
        param_dtype=config.weights_dtype,
        embedding_init=kernel_init(config, axes),
        name=name,
    )


def layer_norm(config: BertConfig, name: str | None = None) -> nn.LayerNorm:
    """A LayerNorm computing in float32 (params in param_dtype) with logical names; callers
    cast the result to the compute dtype. Without `config.use_bias` it only scales."""
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=jnp.float32,
        param_dtype=config.weights_dtype,
        use_bias=config.use_bias,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ('embed',)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
        name=name,
    )


def norm(ln: nn.LayerNorm, x: Array, dtype: jnp.dtype) -> Array:
    # Statistics in float32 for stability even when computing in bfloat16.
    return ln(x.astype(jnp.float32)).astype(dtype)


def hidden_constraint(x: Array) -> Array:
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class DenseNorm(nn.Module):
    """HF's ``*Output`` module: a 'dense' projection and a 'LayerNorm' (used pre or post)."""

    config: BertConfig
    kernel_axes: tuple[str, str]

    def setup(self) -> None:
        self.dense = dense(self.config, self.config.hidden_size, self.kernel_axes)
        self.LayerNorm = layer_norm(self.config)
        self.dropout = nn.Dropout(self.config.dropout_rate)
        # The feed-forward output projects from 'mlp'; the attention output from 'heads'.
        self.adapted = peft.wants_adapter(self.config, ffn=self.kernel_axes[0] == 'mlp')
        if self.adapted:
            self.adapter = peft.Adapter(self.config)

    def project(self, x: Array, deterministic: bool) -> Array:
        h = self.dropout(self.dense(x), deterministic=deterministic)
        return self.adapter(h) if self.adapted else h

    def norm(self, x: Array) -> Array:
        return norm(self.LayerNorm, x, self.config.compute_dtype)


def residual(
    out: DenseNorm, branch: Callable[[Array], Array], x: Array, pre_ln: bool, deterministic: bool,
    normalize: bool = True,
) -> Array:
    """Post-LN: LN(x + drop(f(x))).  Pre-LN: x + drop(f(LN(x))), or x + drop(f(x)) without
    `normalize` (a block whose input is already normalised)."""
    if pre_ln:
        return x + out.project(branch(out.norm(x) if normalize else x), deterministic)
    return out.norm(x + out.project(branch(x), deterministic))


def gated_activation(mlp: str, h: Array) -> Array:
    """GLU of the up projection's 2I features: ``input, gate = split(h)``, act(input) * gate.

    The first half is the activated input and the second the linear gate, as ModernBERT's
    ``Wi(x).chunk(2)``, so a kernel maps onto its Wi by a transpose alone.
    """
    inputs, gate = jnp.split(h, 2, axis=-1)
    if mlp == 'geglu':
        act = jax.nn.gelu(inputs, approximate=False)  # exact erf GELU, as HF 'gelu'
    elif mlp == 'swiglu':
        act = jax.nn.silu(inputs)
    else:
        raise ValueError(f'not a gated mlp: {mlp!r}')
    return act * gate


class BertIntermediate(nn.Module):
    """The feed-forward up projection + activation: H -> I (gelu) or H -> 2I -> I (gated)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        width = 2 * cfg.intermediate_size if cfg.gated_mlp else cfg.intermediate_size
        h = dense(cfg, width, ('embed', 'mlp'), name='dense')(x)
        if cfg.gated_mlp:
            h = gated_activation(cfg.mlp, h)
        else:
            h = jax.nn.gelu(h, approximate=False)  # exact erf GELU, as HF hidden_act='gelu'
        return nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
