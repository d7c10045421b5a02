"""`launch.py import`: a local Hugging Face BERT, RoBERTa, DistilBERT, ELECTRA or ModernBERT
directory -> a workdir of this project.

The workdir looks like a pretraining run's: config.json (continued-pretraining defaults with
the imported architecture: peak lr 1e-4, no corpus until one is named), the tokenizer
(spm.model, or wordpiece.json for a `vocab.txt` WordPiece BERT) and checkpoints/0 holding a
fresh-optimizer TrainState at step 0. So

    python launch.py pretrain --config W/config.json --workdir W-cpt --config.init_from=W \
        --config.data.train_files=TEXT                                # continues pretraining
    python launch.py finetune --config.init_from=W --workdir FT       # fine-tunes from it

Weights are read without pickle: model.safetensors (sharded too), or pytorch_model.bin with
torch.load(weights_only=True) when torch is installed. This project keeps [PAD] [UNK] [CLS]
[SEP] [MASK] at ids 0..4; a WordPiece vocabulary with them elsewhere (BERT's 0, 100..103)
is reordered, and the word-embedding rows and MLM output bias with it. A RoBERTa is a BERT
with other names (convert/names.py), positions from padding_idx + 1 (model.position_offset),
no token types (type_vocab_size 1) and a byte-level BPE tokenizer. A pretrained pooler
(bert.pooler.*, e.g. a bare BertModel's) is kept: model.mlm_pooler. A DistilBERT is a BERT
without token types (one zero row, model.export_as='distilbert'); an ElectraForPreTraining
becomes an objective=electra run (its discriminator, a fresh generator). A ModernBERT is
our modern recipe (rope with its two bases, a gated MLP, pre-LN, local/global attention;
convert/modernbert.py maps its names both ways) with a byte-level BPE tokenizer.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile

import flax.linen as nn
import jax
import numpy as np

from convert import hf_tokenizer_in, modernbert, names
from engine.checkpoint import Checkpoints
from engine.errors import ConfigError
from engine.paths import local_file_argument
from engine.rundir import RunDir
from models.bert import BertConfig
from models.config import model_config
from models.load import overlay_leaves
from pretrain import state as state_lib
from pretrain.sections import step_spec

_CHECKPOINT = re.compile(r'checkpoint-(\d+)$')
# config.json model_type
IMPORTED_TYPES = ('bert', 'roberta', 'electra', 'distilbert', 'modernbert')
HEAD_NAMES = {'mlm': 'MLM head', 'electra': 'discriminator head'}


def resolve_dir(hf_dir: pathlib.Path, step: int | None) -> pathlib.Path:
    """--hf-dir itself, or its Trainer `checkpoint-STEP` subdirectory (default: latest)."""
    if not hf_dir.is_dir():
        raise ConfigError(f'--hf-dir: no such directory {str(hf_dir)!r}')
    saved = {int(m.group(1)): p for p in hf_dir.iterdir() if (m := _CHECKPOINT.match(p.name))}
    if step is not None:
        if step not in saved:
            raise ConfigError(f'--step: no checkpoint-{step} in {hf_dir} (have {sorted(saved)})')
        return saved[step]
    if _weights_files(hf_dir) or not saved:
        return hf_dir
    return saved[max(saved)]


def _read_json(file: pathlib.Path) -> dict:
    """A JSON object file of --hf-dir; a one-line ConfigError if it is not one."""
    try:
        value = json.loads(file.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f'--hf-dir: {file} is not valid JSON ({e})') from None
    if not isinstance(value, dict):
        raise ConfigError(f'--hf-dir: {file} holds a JSON {type(value).__name__}, not an object')
    return value


def _shard(d: pathlib.Path, index: pathlib.Path, name) -> pathlib.Path:
    """A shard named in the index: a .safetensors file inside `d` (never ../ or absolute)."""
    if not isinstance(name, str) or not name.endswith('.safetensors'):
        raise ConfigError(f'--hf-dir: {index.name} names shard {name!r}; expected a '
                          '.safetensors file name')
    parts = pathlib.PurePosixPath(name.replace('\\', '/')).parts
    if (pathlib.PurePosixPath(name).is_absolute() or pathlib.PureWindowsPath(name).anchor
            or '..' in parts):
        raise ConfigError(f'--hf-dir: {index.name} names shard {name!r} outside {d}; '
                          'shards must be files inside --hf-dir')
    return d / name


def _weights_files(d: pathlib.Path) -> list[pathlib.Path]:
    index = d / 'model.safetensors.index.json'
    if index.is_file():
        weight_map = _read_json(index).get('weight_map')
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f'--hf-dir: {index} has no weight_map')
        shards = [_shard(d, index, s) for s in sorted(set(map(str, weight_map.values())))]
        for shard in shards:
            if not shard.is_file():
                raise ConfigError(f'--hf-dir: {index.name} names shard '
                                  f'{str(shard.relative_to(d))!r}, which is not in {d}')
        return shards
    for name in ('model.safetensors', 'pytorch_model.bin'):
        if (d / name).is_file():
            return [d / name]
    return []


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f'{type(e).__name__}: {lines[0]}' if lines else type(e).__name__


def read_weights(d: pathlib.Path, kind: str = 'bert') -> dict[str, np.ndarray]:
    """The state dict as float32 numpy arrays, in BERT's names (ModernBERT's own for `kind`
    'modernbert'); never unpickles arbitrary objects."""
    files = _weights_files(d)
    if not files:
        raise ConfigError(f'--hf-dir: {d} has no model.safetensors or pytorch_model.bin')
    state: dict[str, np.ndarray] = {}
    for file in files:
        if file.suffix == '.safetensors':
            from safetensors import safe_open
            try:
                with safe_open(str(file), framework='numpy') as f:
                    for key in f.keys():
                        state[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
            except Exception as e:  # SafetensorError, OSError, ...: truncated or garbled
                raise ConfigError(f'--hf-dir: {file.name} is not a readable safetensors file '
                                  f'(truncated or corrupt? {_first_line(e)})') from None
        else:
            try:
                import torch
            except ImportError:
                raise ConfigError(f'--hf-dir: reading {file.name} needs torch; convert it to '
                                  'model.safetensors or install torch') from None
            try:
                loaded = torch.load(str(file), map_location='cpu', weights_only=True)
                state.update({k: v.float().numpy() for k, v in loaded.items()})
            except Exception as e:  # truncated zip, pickle refused by weights_only, ...
                raise ConfigError(f'--hf-dir: {file.name} is not a readable PyTorch state '
                                  f'dict (truncated or corrupt? {_first_line(e)})') from None
    if kind == 'modernbert':
        return modernbert.normalize_keys(state)
    return names.normalize_hf_keys(state)


def model_fields(config: dict) -> dict:
    """BertConfig fields from a transformers config.json; refuses what our model lacks."""
    kind = config.get('model_type')
    if kind not in IMPORTED_TYPES:
        found = f'model_type {kind!r}' if 'model_type' in config else 'no model_type'
        known = ', '.join(map(repr, IMPORTED_TYPES[:-1])) + f' or {IMPORTED_TYPES[-1]!r}'
        raise ConfigError(f'--hf-dir: config.json has {found}; only model_type {known} can '
                          'be imported')
    if kind == 'distilbert':
        return _distilbert_fields(config)
    if kind == 'modernbert':
        return modernbert.model_fields(config)
    if config.get('hidden_act', 'gelu') != 'gelu':
        raise ConfigError(f"--hf-dir: hidden_act {config['hidden_act']!r}: only 'gelu' (erf) "
                          'is supported')
    if config.get('position_embedding_type', 'absolute') != 'absolute':
        raise ConfigError('--hf-dir: only absolute position embeddings are supported')
    if kind == 'electra' and config.get('embedding_size', config.get('hidden_size')) != \
            config.get('hidden_size'):
        raise ConfigError(f"--hf-dir: ELECTRA embedding_size {config['embedding_size']} != "
                          f"hidden_size {config.get('hidden_size')}: the embeddings "
                          'projection of small ELECTRAs has no place in this model')
    try:
        return {'vocab_size': config['vocab_size'], 'hidden_size': config['hidden_size'],
                'num_layers': config['num_hidden_layers'],
                'num_heads': config['num_attention_heads'],
                'intermediate_size': config['intermediate_size'],
                'max_position_embeddings': config['max_position_embeddings'],
                'type_vocab_size': config.get('type_vocab_size', 2),
                'dropout_rate': config.get('hidden_dropout_prob', 0.1),
                'attention_dropout_rate': config.get('attention_probs_dropout_prob', 0.1),
                'layer_norm_eps': config.get('layer_norm_eps', 1e-12),
                'initializer_range': config.get('initializer_range', 0.02),
                # RoBERTa's first position id is padding_idx + 1 (transformers'
                # create_position_ids_from_input_ids), for right-padded rows.
                **({'position_offset': config.get('pad_token_id', 1) + 1}
                   if kind == 'roberta' else {})}
    except KeyError as e:
        raise ConfigError(f'--hf-dir: config.json has no {e.args[0]}') from None


def _distilbert_fields(config: dict) -> dict:
    """DistilBERT: BERT without token types (one all-zero row here), its own field names."""
    if config.get('activation', 'gelu') != 'gelu':
        raise ConfigError(f"--hf-dir: activation {config['activation']!r}: only 'gelu' (erf) "
                          'is supported')
    if config.get('sinusoidal_pos_embds'):
        raise ConfigError('--hf-dir: sinusoidal_pos_embds: only learned position embeddings '
                          'are supported')
    try:
        return {'vocab_size': config['vocab_size'], 'hidden_size': config['dim'],
                'num_layers': config['n_layers'], 'num_heads': config['n_heads'],
                'intermediate_size': config['hidden_dim'],
                'max_position_embeddings': config['max_position_embeddings'],
                'type_vocab_size': 1, 'export_as': 'distilbert', 'classifier_head': 'distilbert',
                'dropout_rate': config.get('dropout', 0.1),
                'attention_dropout_rate': config.get('attention_dropout', 0.1),
                'layer_norm_eps': 1e-12,  # fixed in transformers' DistilBERT
                'initializer_range': config.get('initializer_range', 0.02)}
    except KeyError as e:
        raise ConfigError(f'--hf-dir: config.json has no {e.args[0]}') from None


# Continued pretraining of an imported (real, pretrained) encoder: not the tiny recipe's
# 2e-3, which would wreck its weights, but BERT-base's own peak (1e-4; Devlin et al. 2018)
# with a 10 % warm-up, over the user's own text (data.train_files, which they must name).
CONTINUE_LEARNING_RATE = 1e-4
CONTINUE_STEPS = 1000
CONTINUE_WARMUP_STEPS = 100
TEXT_PLACEHOLDER = 'YOUR_TEXT'


def pretrain_config(fields: dict, tokenizer_type: str, objective: str = 'mlm'):
    """Continued-pretraining defaults with the imported architecture, tokenizer kind and
    objective ('electra' for an ELECTRA discriminator: a fresh generator beside it)."""
    from configs.pretrain import get_config
    cfg = get_config('tiny')
    cfg.objective = objective
    for key, value in fields.items():  # keys the recipe lacks (layer_norm_eps, ...) are added
        cfg.model[key] = type(cfg.model[key])(value) if key in cfg.model else value
    cfg.seq_len = min(cfg.seq_len, fields['max_position_embeddings']
                      - fields.get('position_offset', 0))
    cfg.num_train_steps = CONTINUE_STEPS
    cfg.eval_every_steps = cfg.checkpoint_every_steps = CONTINUE_STEPS // 2
    cfg.optimizer.learning_rate = CONTINUE_LEARNING_RATE
    cfg.optimizer.warmup_steps = CONTINUE_WARMUP_STEPS
    cfg.data.train_files = ''  # the user's corpus: no demo text by default
    with cfg.data.ignore_type():
        cfg.data.tokenizer_type = tokenizer_type
    return cfg


def has_pooler(state: dict) -> bool:
    """Whether the state dict holds a pretrained pooler (all of it, or a ConfigError)."""
    present = set(names.POOLER_KEYS) & state.keys()
    if present and len(present) < len(names.POOLER_KEYS):
        raise ConfigError(f'--hf-dir: incomplete pooler, missing '
                          f'{sorted(set(names.POOLER_KEYS) - present)}')
    return bool(present)


def _bert_params(state: dict, kind: str, model_cfg: BertConfig) -> tuple[dict, bool]:
    """(our params of the state dict, whether it has the head of `kind`)."""
    layers = model_cfg.num_layers
    head = names.head_keys(layers, kind)
    present = head & state.keys()
    pooler = set(names.POOLER_KEYS) if model_cfg.mlm_pooler else set()
    keys = names.encoder_keys(layers) | (head if present else set()) | pooler
    if present and present != head:
        raise ConfigError(f'--hf-dir: incomplete {HEAD_NAMES[kind]}, missing '
                          f'{sorted(head - present)}')
    try:
        return names.from_hf(state, layers, kind, keys, model_cfg.mlm_pooler), bool(present)
    except KeyError as e:
        raise ConfigError(f'--hf-dir: the weights have no {e.args[0]}') from None


def _head_params(state: dict, cfg, model_cfg: BertConfig, family: str
                 ) -> tuple[dict, str, set[str]]:
    """Our params from the state dict: the MLM (ELECTRA: discriminator) head if it has
    one, else a fresh one; the pooler when model_cfg.mlm_pooler; ELECTRA's generator is
    always fresh (transformers keeps it in another model). Also the keys used."""
    kind = _head_kind(cfg)
    if family == 'modernbert':
        present = modernbert.has_head(state)
        ours, used = modernbert.from_hf(state, model_cfg, present)
    else:
        ours, present = _bert_params(state, kind, model_cfg)
        used = {hf for _, hf, _ in names.name_map(model_cfg.num_layers, kind,
                                                  model_cfg.mlm_pooler)}
    built = _built(cfg, model_cfg)
    if present and kind == 'mlm':  # shapes only: no need to initialise what is replaced
        base = built.abstract.params
    else:
        base = jax.tree.map(np.asarray, nn.unbox(built.init()).params)
    params = overlay_leaves(base, ours)
    _check_shapes(base, params)
    return params, 'imported' if present else 'freshly initialised (not in the checkpoint)', used


def _built(cfg, model_cfg: BertConfig) -> state_lib.PretrainState:
    """The state `pretrain` builds for this config (pretrain/state.py), on a one-device
    abstract mesh: the import needs its shapes, fresh init and optimizer, not shardings."""
    mesh = jax.sharding.AbstractMesh((1,) * len(cfg.mesh.axes), tuple(cfg.mesh.axes))
    return state_lib.build(step_spec(cfg, model_cfg), mesh)


def _head_kind(cfg) -> str:
    return 'electra' if cfg.objective == 'electra' else 'mlm'


def _check_shapes(want: dict, got: dict, path: str = '') -> None:
    for key, value in want.items():
        if isinstance(value, dict):
            _check_shapes(value, got[key], f'{path}{key}/')
        elif value.shape != got[key].shape:
            raise ConfigError(f'--hf-dir: {path}{key} has shape {got[key].shape}, the config '
                              f'says {value.shape}')


def _save(tmp: pathlib.Path, cfg, model_cfg: BertConfig, params: dict, source: str) -> None:
    run = RunDir(tmp)
    run.write_config(cfg.to_dict())
    state = state_lib.imported_state(_built(cfg, model_cfg), params)  # as `pretrain` builds it
    meta = state_lib.checkpoint_meta(step_spec(cfg, model_cfg), cfg.to_dict(), 0,
                                     imported_from=source)
    ckpts = Checkpoints(str(run.checkpoints), keep=cfg.keep_checkpoints, async_save=False)
    ckpts.save(0, state, meta)
    ckpts.close()


def run(hf_dir: str, workdir: str, step: int | None = None) -> None:
    """Imports the BERT in `hf_dir` into a new `workdir`."""
    local_file_argument(hf_dir, '--hf-dir', 'import')
    local_file_argument(workdir, '--workdir', 'import')
    given = pathlib.Path(hf_dir).absolute()
    source = resolve_dir(given, step)
    target = pathlib.Path(workdir).absolute()
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f'--workdir: {workdir} exists and is not empty')
    if not (source / names.HF_CONFIG_FILENAME).is_file():
        raise ConfigError(f'--hf-dir: {source} has no {names.HF_CONFIG_FILENAME}')
    hf_config = _read_json(source / names.HF_CONFIG_FILENAME)
    fields = model_fields(hf_config)
    family = hf_config['model_type']
    objective = 'electra' if family == 'electra' else 'mlm'
    state = read_weights(source, family)
    if family == 'distilbert':
        state = names.from_distilbert(state)
    if modernbert.has_pooler(state) if family == 'modernbert' else has_pooler(state):
        fields['mlm_pooler'] = True
    model_cfg = model_config(fields)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=target.parent))
    try:
        # A Trainer checkpoint-N folder keeps its tokenizer in the run folder above it;
        # any other --hf-dir must hold its own (never a stray one from its parent).
        tok = hf_tokenizer_in.import_tokenizer([source] if source == given else [source, given],
                                               tmp)
        state = hf_tokenizer_in.reorder_vocab(state, tok.order)
        cfg = pretrain_config(fields, tok.kind, objective)
        params, head, used = _head_params(state, cfg, model_cfg, family)
        _save(tmp, cfg, model_cfg, params, str(source))
        if target.exists():
            target.rmdir()
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _report(source, workdir, model_cfg, tok, (_head_kind(cfg), head), set(state) - used)


def _report(source, workdir: str, m: BertConfig, tok, head: tuple[str, str],
            unused: set[str]) -> None:
    ignored = sorted(unused - set(names.IGNORED_HF_KEYS) - set(modernbert.IGNORED_KEYS))
    moved = ' (special tokens moved to ids 0..4)' if tok.moved else ''
    pooler = '; pooler imported' if m.mlm_pooler else ''
    print(f'imported {source}: {m.num_layers} layers, hidden {m.hidden_size}, vocab '
          f'{m.vocab_size}, {tok.kind} tokenizer{moved}; {HEAD_NAMES[head[0]]} {head[1]}'
          f'{pooler}', flush=True)
    if ignored:
        print(f'not imported (no place in a pretraining run): {", ".join(ignored[:6])}'
              f'{" ..." if len(ignored) > 6 else ""}', flush=True)
    print(next_commands(workdir), flush=True)


def next_commands(workdir: str) -> str:
    """The continued-pretraining and fine-tuning commands that use the imported defaults."""
    cpt = f'{workdir.rstrip("/")}-cpt'
    return (f'continue pretraining on your text (peak lr {CONTINUE_LEARNING_RATE:g}, '
            f'{CONTINUE_WARMUP_STEPS} warm-up steps, {CONTINUE_STEPS:,} steps):\n'
            f'  python launch.py pretrain --config {workdir}/config.json --workdir {cpt} '
            f'--config.init_from={workdir} --config.data.train_files={TEXT_PLACEHOLDER}\n'
            f'fine-tune (from {workdir}, or from {cpt} after continued pretraining):\n'
            f'  python launch.py finetune --config configs/finetune.py:custom --workdir FT '
            f'--config.init_from={workdir} --config.data.train_file=YOUR_LABELS.csv')
