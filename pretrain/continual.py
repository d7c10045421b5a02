"""Continual pretraining: a `launch.py pretrain` run that starts from another run's weights.

    python launch.py pretrain --config configs/pretrain.py:tiny --workdir W \\
        --config.init_from=runs/tiny --config.data.train_files=pydocs

`init_from` is a pretraining workdir, ours or one made by `launch.py import`. The model's
architecture comes from its config.json (this config's model size is ignored; dropout,
dtype and remat stay this config's), its weights from its checkpoint `init_step` (latest
by default). The optimizer starts fresh: new Adam moments, step 0, the warm-up and decay
of this config (old moments belong to another data distribution and schedule). Once this
run has saved a checkpoint, it resumes from its own checkpoints and never reads init_from's
weights again.

Tokenizer (`continual.tokenizer`): 'keep' copies init_from's and loads every parameter as it
is; 'train' trains a new one on this run's text. A new vocabulary rebuilds the two
vocabulary-sized parameters (the word embeddings, which the MLM decoder shares, and the MLM
output bias): rows of pieces in both vocabularies are copied by piece string; a new piece
gets the mean of the old rows of its old tokenization ('subwords', as in Fast Vocabulary
Transfer, Gee et al. 2022), or of all old rows ('mean'; Hewitt 2021). Both keep a new
piece's logit near those of the pieces it is made of or of an average piece, where the
model's random init (N(0, 0.02) rows beside trained rows of larger norm) would start every
new piece as a near-zero logit that the softmax must first learn to raise or suppress.

Forgetting (`continual.old_eval_files`): the run also evaluates held-out text of the old
domain, logged as old_eval_loss / old_eval_mlm_accuracy at step 0 (before any update)
and at every eval. 'init_from' rebuilds init_from's own eval split; with its tokenizer
kept, the step-0 numbers equal init_from's final eval exactly.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from engine.checkpoint import flat_shapes, read_meta_and_shapes, saved_steps, subtree_reader
from engine.config_cli import read_run_config
from engine.errors import ConfigError
from engine.mesh import replicated, strip_boxes
from engine.paths import absolute_path, write_bytes_atomic
from engine.rundir import RunDir
from engine.step import TrainState
from models.bert import BertForMaskedLM
from models.config import RUNTIME_FIELDS, model_config
from models.load import Resize, load_whole
from pretrain import data
from text import corpus
from text.batches import Mixed
from text.packing import pack_documents
from text.records import ArraySequences
from text.tokenizer import SPECIAL_PIECES, load_tokenizer
from text.units import iter_texts

TOKENIZER_MODES = ('keep', 'train')
NEW_ROWS = ('subwords', 'mean')
# What makes the weights fit is taken from init_from; RUNTIME_FIELDS (dropout, dtype,
# remat) stay this run's.
EMBEDDINGS = ('bert', 'embeddings', 'word_embeddings', 'embedding')
OUTPUT_BIAS = ('cls', 'predictions', 'bias')


@dataclasses.dataclass(frozen=True)
class Source:
    """The run continued from."""

    root: epath.Path
    step: int  # its checkpoint read
    config: ml_collections.ConfigDict  # its config.json
    tokenizer_path: str
    imported: bool  # made by `launch.py import`: its eval text is not its training text


def resolve(cfg: ml_collections.ConfigDict
            ) -> tuple[ml_collections.ConfigDict, Source | None]:
    """(this run's config, the run it continues): without init_from, `cfg` and None; with
    it, a copy of `cfg` whose model section is init_from's architecture (`cfg` itself is
    left as given).

    Raises ConfigError (one line) before anything is written.
    """
    if not cfg.init_from:
        return cfg, None
    k = cfg.continual
    if k.tokenizer not in TOKENIZER_MODES:
        raise ConfigError(f'continual.tokenizer: must be one of {TOKENIZER_MODES}, '
                          f'got {k.tokenizer!r}')
    if k.new_rows not in NEW_ROWS:
        raise ConfigError(f'continual.new_rows: must be one of {NEW_ROWS}, got {k.new_rows!r}')
    if k.tokenizer == 'train' and cfg.data.tokenizer_model:
        raise ConfigError("continual.tokenizer: 'train' and data.tokenizer_model both name "
                          'a tokenizer; set one')
    src = _source(cfg)
    cfg = copy.deepcopy(cfg)
    _apply_model(cfg, src)
    return cfg, src


def _source(cfg) -> Source:
    root = absolute_path(cfg.init_from)
    if not root.is_dir():
        raise ConfigError(f'init_from: no such directory {cfg.init_from!r}')
    run = RunDir(root)
    tok = run.tokenizer_file()
    if tok is None or not run.config_file.is_file():
        raise ConfigError(f'init_from: {cfg.init_from!r} has no tokenizer or config.json; is '
                          'it a pretraining workdir?')
    saved = saved_steps(run.checkpoints, cfg.init_step)
    old = read_run_config(root)
    step = cfg.init_step or saved[-1]
    meta, shapes = read_meta_and_shapes(run.checkpoints, step)
    _check_shapes(old, shapes)
    return Source(root, step, old, tok, 'imported_from' in meta)


def _check_shapes(old: ml_collections.ConfigDict, saved: dict[str, tuple]) -> None:
    """The checkpoint holds the model its config.json describes (hidden size, layers...)."""
    model = BertForMaskedLM(model_config(old.model.to_dict()))
    ids = jnp.zeros((1, 2), jnp.int32)
    want = flat_shapes(strip_boxes(jax.eval_shape(
        lambda: model.init(jax.random.key(0), ids, ids))['params']))
    for path in sorted(want.keys() | saved.keys()):
        if want.get(path) != saved.get(path):
            raise ConfigError(f'init_from: its checkpoint does not fit its config.json model: '
                              f'{path} is {saved.get(path, "absent")} in the checkpoint, '
                              f'{want.get(path, "absent")} in the model')


def _apply_model(cfg, src: Source) -> None:
    """Sets (on resolve's own copy) this run's model: init_from's architecture and
    vocabulary size (the new tokenizer's target size with continual.tokenizer='train' or a
    different data.tokenizer_model)."""
    model = src.config.model.to_dict()
    for key in RUNTIME_FIELDS:
        model.pop(key, None)
    vocab = _vocab_size(cfg, src, model['vocab_size'])
    changed = [f'{k} {cfg.model[k]} -> {v}' for k, v in {**model, 'vocab_size': vocab}.items()
               if k in cfg.model and cfg.model[k] != v]
    if changed and jax.process_index() == 0:
        print(f'model: architecture of init_from ({", ".join(changed)})', flush=True)
    with cfg.unlocked(), cfg.model.ignore_type():
        for key, value in model.items():  # an imported run adds layer_norm_eps, ...
            cfg.model[key] = value
        cfg.model.vocab_size = vocab
    if (cfg.model.get('position_embedding', 'learned') == 'learned'
            and cfg.seq_len > cfg.model.max_position_embeddings):
        raise ConfigError(f'seq_len: {cfg.seq_len} exceeds the max_position_embeddings '
                          f'({cfg.model.max_position_embeddings}) of init_from {cfg.init_from}')


def _vocab_size(cfg, src: Source, old_size: int) -> int:
    if cfg.continual.tokenizer == 'train':
        return cfg.continual.vocab_size or old_size
    if not cfg.data.tokenizer_model:
        return old_size
    try:
        given = load_tokenizer(cfg.data.tokenizer_model)
    except (OSError, ValueError) as e:
        raise ConfigError(f'data.tokenizer_model: {e}') from None
    return old_size if same_vocabulary(load_tokenizer(src.tokenizer_path), given) else (
        given.vocab_size)


def same_vocabulary(a, b) -> bool:
    """Same pieces at the same ids."""
    return a.vocab_size == b.vocab_size and all(
        a.id_to_piece(i) == b.id_to_piece(i) for i in range(a.vocab_size))


def copy_tokenizer(cfg, src: Source | None, workdir: epath.Path) -> None:
    """With continual.tokenizer='keep', init_from's tokenizer becomes this run's (once)."""
    if src is None or cfg.continual.tokenizer != 'keep' or cfg.data.tokenizer_model:
        return
    if RunDir(workdir).tokenizer_file() is None:
        given = epath.Path(src.tokenizer_path)
        write_bytes_atomic(workdir / given.name, given.read_bytes())


# ---------------------------------------------------------------- weights


def _piece_key(piece: str, wordpiece: bool) -> tuple[bool, str]:
    """(starts a word, text): the same key for a sentencepiece '▁the' and a WordPiece 'the',
    or 'ing' and '##ing', so rows move between the two kinds of vocabulary too."""
    if piece in SPECIAL_PIECES:
        return True, piece
    if wordpiece:
        return (False, piece[2:]) if piece.startswith('##') else (True, piece)
    return (True, piece[1:]) if piece.startswith('\u2581') else (False, piece)


def _pieces(tokenizer) -> list[tuple[bool, str]]:
    wordpiece = tokenizer.path.endswith('.json')
    return [_piece_key(tokenizer.id_to_piece(i), wordpiece) for i in range(tokenizer.vocab_size)]


def resize_vocab(table: np.ndarray, bias: np.ndarray, old_tok, new_tok, vocab_size: int,
                 new_rows: str = 'subwords') -> tuple[np.ndarray, np.ndarray, int]:
    """(table, bias, copied) for the new vocabulary: shared pieces' rows copied, others
    initialised from old rows (see the module docstring); rows past the new tokenizer's
    pieces (a model vocabulary larger than the tokenizer's) get the mean row."""
    old_index = {key: i for i, key in enumerate(_pieces(old_tok))}
    trained = np.arange(len(SPECIAL_PIECES), old_tok.vocab_size)  # the old regular pieces
    mean_row, mean_bias = table[trained].mean(0), bias[trained].mean()
    new_table = np.tile(mean_row, (vocab_size, 1)).astype(table.dtype)
    new_bias = np.full((vocab_size,), mean_bias, dtype=bias.dtype)
    copied = 0
    for i, key in enumerate(_pieces(new_tok)[:vocab_size]):
        if key in old_index:
            new_table[i], new_bias[i] = table[old_index[key]], bias[old_index[key]]
            copied += 1
        elif new_rows == 'subwords':
            ids = [j for j in old_tok.encode(key[1]) if len(SPECIAL_PIECES) <= j < len(table)]
            if ids:
                new_table[i], new_bias[i] = table[ids].mean(0), bias[ids].mean()
    return new_table, new_bias, copied


def load_params(cfg, src: Source, tokenizer, abstract_params, param_shardings, mesh):
    """init_from's params on this run's shardings; the vocabulary-sized ones resized when
    the tokenizer changed. Returns (params, a line for the log)."""
    old_tok = load_tokenizer(src.tokenizer_path)
    old_vocab = src.config.model.vocab_size
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params, param_shardings)
    copied = []
    resize = None
    if old_vocab != cfg.model.vocab_size or not same_vocabulary(old_tok, tokenizer):
        def apply(saved: dict) -> dict:
            table, bias, count = resize_vocab(
                np.asarray(saved[EMBEDDINGS]), np.asarray(saved[OUTPUT_BIAS]), old_tok,
                tokenizer, cfg.model.vocab_size, cfg.continual.new_rows)
            copied.append(count)
            return {EMBEDDINGS: table, OUTPUT_BIAS: bias}
        whole = replicated(mesh)  # the old vocabulary-sized leaves, read onto every device
        resize = Resize(saved={
            EMBEDDINGS: jax.ShapeDtypeStruct((old_vocab, cfg.model.hidden_size), jnp.float32,
                                             sharding=whole),
            OUTPUT_BIAS: jax.ShapeDtypeStruct((old_vocab,), jnp.float32, sharding=whole)},
            apply=apply)
    try:
        params = load_whole(target, subtree_reader(str(RunDir(src.root).checkpoints),
                                                   src.step), resize)
    except ValueError as e:  # shapes differ from those its config.json gives
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f'init_from: its checkpoint does not fit the model of its '
                          f'config.json ({first})') from None
    if resize is None:
        return params, f'init_from: {src.root} step {src.step}, all params loaded as saved'
    return params, (f'init_from: {src.root} step {src.step}; vocabulary {old_vocab} -> '
                    f'{cfg.model.vocab_size}: {copied[0]} rows copied by piece, the rest '
                    f"'{cfg.continual.new_rows}'")


def initial_state(cfg, src: Source, tokenizer, tx, abstract, shardings, mesh):
    """Step 0 of a continual run: init_from's params, a fresh optimizer state."""
    params, line = load_params(cfg, src, tokenizer, abstract.params, shardings.params, mesh)
    if jax.process_index() == 0:
        print(line + '; optimizer state fresh', flush=True)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


# ---------------------------------------------------------------- old held-out text


def old_eval_source(cfg, src: Source | None, tokenizer, data_dir: str):
    """The old domain's held-out text in this run's tokenization, packed to this run's
    seq_len (a `read`-able source for the evaluator); or None.

    'init_from' rebuilds init_from's eval split as its run did: its eval files, or the
    same hash-held-out documents of its training text (prepared again with this run's
    tokenizer; every process takes part).
    """
    spec = cfg.continual.old_eval_files
    if not spec or (spec == 'init_from' and (src is None or src.imported)):
        return None
    key = 'continual.old_eval_files'
    try:
        if spec != 'init_from':
            files = corpus.resolve_text_files(spec, 'validation', key)
            return ArraySequences(_packed(files, tokenizer, cfg.seq_len, key))
        old = _as_old_domain(cfg, src.config)
        parts = []
        for source in data.resolve_sources(old):
            if source.eval is not None:
                parts.append(ArraySequences(_packed(source.eval, tokenizer, cfg.seq_len, key)))
                continue
            directory = data.prepare_source(data.prepare_spec(old, source.train, None),
                                            tokenizer, data_dir, cfg.data.workers)
            parts.append(data.open_split(directory, 'validation', cfg.data.cache_mb))
    except (ValueError, ConfigError) as e:
        message = str(e)
        raise ConfigError(message if message.startswith(key) else f'{key}: {message}') from None
    return parts[0] if len(parts) == 1 else Mixed(parts, None)


def _as_old_domain(cfg, old):
    """This run's config with init_from's data settings and seed (its held-out split
    depends on them), keeping this run's seq_len."""
    merged = ml_collections.ConfigDict(cfg.to_dict())
    merged.seed = old.seed
    with merged.data.ignore_type():
        for k, v in old.data.items():
            if k in merged.data:
                merged.data[k] = v
    return merged


def _packed(sources, tokenizer, seq_len: int, key: str) -> dict:
    """As the data build does: one document per line, empty encodings dropped."""
    texts = list(iter_texts(list(sources), 'line', 'validation', key))
    docs = [ids for ids in tokenizer.encode_batch(texts) if ids]
    if not docs:
        raise ConfigError(f'{key}: the old held-out text has no document')
    return pack_documents(docs, seq_len)
