"""The pretraining config read into typed parts (the model's BertConfig, the step's
StepSpec, the masking budget) and checked as a whole; shared by the run, its dry runs
and the benchmark.

Every check raises ConfigError with one line naming the key, before anything is written.
"""

import math

import jax
import ml_collections
from etils import epath

from engine import mesh as mesh_lib
from engine.errors import ConfigError
from engine.optim import OptimizerConfig, make_optimizer
from engine.run import check_batch_split, run_mesh
from models.config import BertConfig, model_config
from pretrain import data, objective, phases
from pretrain.masking import MaskingConfig
from pretrain.objective import ObjectiveConfig
from pretrain.state import StepSpec


def bert_config(cfg: ml_collections.ConfigDict) -> BertConfig:
    """The model's frozen dataclass from the `model` section (layers never see the rest)."""
    try:
        return model_config(cfg.model.to_dict())
    except ValueError as e:
        raise ConfigError(f'model: {e}') from None


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    """The `optimizer` section, typed and validated (ConfigError naming the key)."""
    return OptimizerConfig.from_config(cfg.optimizer)


def step_spec(cfg: ml_collections.ConfigDict, model_cfg: BertConfig | None = None) -> StepSpec:
    """What pretrain/state.py builds the state and step from (`model_cfg`: the model
    section's, unless a caller swaps in another kernel, as `--compile-for` does)."""
    model_cfg = model_cfg or bert_config(cfg)
    return StepSpec(model=model_cfg, optimizer=optimizer_config(cfg),
                    objective=ObjectiveConfig.from_config(cfg, model_cfg), seed=cfg.seed,
                    batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                    grad_accum_steps=cfg.grad_accum_steps, num_train_steps=cfg.num_train_steps,
                    rules=tuple(tuple(rule) for rule in cfg.mesh.rules))


def masking_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> MaskingConfig:
    k = cfg.masking
    max_predictions = k.max_predictions or math.ceil(k.mask_rate * cfg.seq_len)
    return MaskingConfig(vocab_size=vocab_size, max_predictions=max_predictions,
                         mask_rate=k.mask_rate, mask_token_rate=k.mask_token_rate,
                         random_token_rate=k.random_token_rate, whole_word=k.whole_word,
                         span_length=k.get('span_length', 0.0))


def validate(cfg: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh, dict]:
    """Checks everything checkable up front; returns the mesh and the resolved sources.

    Raises ConfigError with a one-line message naming the key.
    """
    validate_values(cfg)
    mesh = run_mesh(cfg.mesh.shape, cfg.mesh.axes)
    check_batch(cfg, mesh_lib.data_parallel_size(mesh))
    if cfg.data.tokenizer_model and not epath.Path(cfg.data.tokenizer_model).is_file():
        raise ConfigError(f'data.tokenizer_model: no such file {cfg.data.tokenizer_model!r}')
    return mesh, data.resolve_sources(cfg)


def validate_values(cfg: ml_collections.ConfigDict) -> None:
    """The checks that need neither devices nor files (shared with `--dry-run`)."""
    for key in ('num_train_steps', 'batch_size', 'seq_len', 'grad_accum_steps',
                'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
        if cfg[key] < 1:
            raise ConfigError(f'{key}: must be >= 1, got {cfg[key]}')
    model = bert_config(cfg)
    if model.position_embedding == 'learned' and cfg.seq_len > model.max_position_embeddings:
        raise ConfigError(f'seq_len: {cfg.seq_len} exceeds model.max_position_embeddings '
                          f'({model.max_position_embeddings})')
    if not 0 < cfg.masking.mask_rate < 1:
        raise ConfigError(f'masking.mask_rate: must be in (0, 1), got {cfg.masking.mask_rate}')
    objective.validate(cfg, model)  # objective, electra.*, masking.eval_mask_rate/span_length
    make_optimizer(optimizer_config(cfg), cfg.num_train_steps)  # ConfigError on a bad key
    learned = model.position_embedding == 'learned'
    phases.check(cfg, model.max_position_embeddings if learned else None)
    check_read_block(cfg)


def check_read_block(cfg: ml_collections.ConfigDict) -> None:
    """data.read_block: a whole number >= 1; > 1 only with one batch shape per run."""
    block = cfg.data.get('read_block', 1)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ConfigError(f'data.read_block: must be a whole number >= 1, got {block!r}')
    if block > 1 and phases.StepPlan(cfg).active:
        raise ConfigError('data.read_block: > 1 is not supported with seq_len_phases or '
                          'batch_size_ramp; use 1')


def check_batch(cfg: ml_collections.ConfigDict, data_parallel: int) -> None:
    """The global batch splits evenly over data-parallel devices and micro-batches."""
    check_batch_split(cfg.batch_size, data_parallel, cfg.grad_accum_steps)
    phases.check(cfg, None, data_parallel)  # batch_size_ramp's sizes too
