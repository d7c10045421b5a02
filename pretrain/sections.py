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
    check_phases(cfg, model.max_position_embeddings if learned else None)
    check_read_block(cfg)


def check_read_block(cfg: ml_collections.ConfigDict) -> None:
    """data.read_block: a whole number >= 1; > 1 only with one batch shape per run."""
    block = cfg.data.get('read_block', 1)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ConfigError(f'data.read_block: must be a whole number >= 1, got {block!r}')
    if block > 1 and step_plan(cfg).active:
        raise ConfigError('data.read_block: > 1 is not supported with seq_len_phases or '
                          'batch_size_ramp; use 1')


def check_batch(cfg: ml_collections.ConfigDict, data_parallel: int) -> None:
    """The global batch splits evenly over data-parallel devices and micro-batches."""
    check_batch_split(cfg.batch_size, data_parallel, cfg.grad_accum_steps)
    check_phases(cfg, None, data_parallel)  # batch_size_ramp's sizes too


def step_plan(cfg: ml_collections.ConfigDict) -> phases.StepPlan:
    """Each step's shape (seq_len_phases, batch_size_ramp; pretrain/phases.py)."""
    return phases.StepPlan(cfg.num_train_steps, cfg.batch_size, cfg.seq_len,
                           cfg.get('seq_len_phases', ''), cfg.get('batch_size_ramp', ''))


def with_seq_len(cfg: ml_collections.ConfigDict, seq_len: int) -> ml_collections.ConfigDict:
    """A copy of `cfg` with `seq_len` replaced (one phase's preparation, masking, step)."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.seq_len = seq_len
    return out


def final_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg` with seq_len = the last phase's length when seq_len_phases is set (the length
    evaluation, init and the logs use); `cfg` itself otherwise."""
    planned = phases.parse_phases(cfg.get('seq_len_phases', ''), cfg.num_train_steps)
    if not planned or planned[-1].seq_len == cfg.seq_len:
        return cfg
    return with_seq_len(cfg, planned[-1].seq_len)


def check_phases(cfg: ml_collections.ConfigDict, max_positions: int | None,
                 data_parallel: int = 1) -> None:
    """One-line ConfigErrors for the phase, ramp and budget-schedule keys. `max_positions`:
    the learned position table's size (None: RoPE, no table)."""
    plan = step_plan(cfg)
    longest = max(p.seq_len for p in plan.phases)
    if max_positions is not None and longest > max_positions:
        raise ConfigError(f'seq_len_phases: the longest phase ({longest}) exceeds '
                          f'model.max_position_embeddings ({max_positions})')
    unit = data_parallel * cfg.grad_accum_steps
    if plan.ramp_steps and plan.ramp_start % unit:
        raise ConfigError(f'batch_size_ramp: START {plan.ramp_start} is not divisible by the '
                          f'data-parallel size {data_parallel} x grad_accum_steps '
                          f'{cfg.grad_accum_steps}')
    if cfg.optimizer.schedule == 'budget' and not (cfg.max_runtime or cfg.train_tokens):
        raise ConfigError("optimizer.schedule: 'budget' needs max_runtime or train_tokens "
                          '(the budget whose spent fraction drives the learning rate)')


def check_plan_resume(cfg: ml_collections.ConfigDict, saved: dict) -> None:
    """A checkpoint of a planned run resumes only with the same plan (the shapes, and the
    rows read before each step, would differ): one-line ConfigError otherwise. `saved`: the
    checkpoint's config."""
    keys = ('seq_len_phases', 'batch_size_ramp')
    if not any(saved.get(k) or cfg.get(k) for k in keys):
        return
    for key in (*keys, 'num_train_steps'):
        if saved.get(key, '') != cfg.get(key, ''):
            raise ConfigError(f'{key}: the checkpoint was made with {saved.get(key, "")!r}, '
                              f'now {cfg.get(key, "")!r}; seq_len_phases and batch_size_ramp '
                              'runs resume only with the same plan. Use a new --workdir.')
