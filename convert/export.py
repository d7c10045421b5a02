"""`launch.py export`: a workdir -> a Hugging Face transformers directory (PyTorch BERT).

A pretraining workdir becomes `BertForMaskedLM`; a fine-tuning workdir (it has model.json
and task.json) becomes `BertForSequenceClassification` with id2label/label2id (regression:
one output, problem_type 'regression'). Written: config.json, model.safetensors (numpy
API: no torch needed), tokenizer.json + tokenizer_config.json + special_tokens_map.json,
and this project's own tokenizer file (spm.model or wordpiece.json) so `import` restores it
exactly. A model with position_offset (an imported RoBERTa) becomes RobertaForMaskedLM /
RobertaForSequenceClassification (our pooler + classifier are its classifier.dense +
out_proj), its byte-level BPE tokenizer.json written back as imported; a kept pretrained
pooler (model.mlm_pooler) is written as bert.pooler.* / roberta.pooler.*, which
*ForSequenceClassification reads. A classifier exports to its encoder family's
*ForSequenceClassification only with that family's head and pooling (CLASSIFIER_HEADS:
model.classifier_head, model.pooling): DistilBERT's (our pooler is its pre_classifier) and
ModernBERT's (cls or mean; convert/modernbert.py) too. An imported WordPiece BERT whose
special tokens `import` moved to ids 0..4 is written back in its original id order
(vocab.txt, tokenizer.json, the word-embedding rows and MLM output bias), so the original
tokenizer works with the exported weights; a workdir whose vocabulary no longer allows
that (resized) is refused. Everything goes to a temporary directory beside --output that
is renamed at the end, after verification: a failure leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
from etils import epath

from convert import hf_tokenizer_in, modernbert, names, st_export, tokenizer_files, verify
from engine.errors import ConfigError
from engine.paths import absolute_path, local_file_argument
from engine.rundir import WORDPIECE_FILENAME, RunDir
from finetune.saved_run import load_workdir
from models.bert import BertConfig, non_bert_options
from text.tokenizer import CLS_ID, PAD_ID, SEP_ID, SPECIAL_PIECES, load_tokenizer

ARCHITECTURES = {'mlm': 'BertForMaskedLM', 'classifier': 'BertForSequenceClassification',
                 'token_classifier': 'BertForTokenClassification',
                 'qa': 'BertForQuestionAnswering'}
ELECTRA_ARCHITECTURE = 'ElectraForPreTraining'  # the discriminator; the generator stays
ROBERTA_ARCHITECTURES = {'mlm': 'RobertaForMaskedLM',
                         'classifier': 'RobertaForSequenceClassification',
                         'token_classifier': 'RobertaForTokenClassification',
                         'qa': 'RobertaForQuestionAnswering'}
# Our classifier head -> RobertaClassificationHead (dense + tanh on <s>, then out_proj).
ROBERTA_CLASSIFIER = (('bert.pooler.dense.', 'classifier.dense.'),
                      ('classifier.', 'classifier.out_proj.'))


# The classifier head and poolings each exported family's *ForSequenceClassification has.
CLASSIFIER_HEADS = {'bert': ('bert', ('cls',)), 'roberta': ('bert', ('cls',)),
                    'distilbert': ('distilbert', ('cls',)),
                    'modernbert': ('modernbert', ('cls', 'mean'))}


def export_kind(head: str, model_cfg: BertConfig) -> str:
    """'bert', 'roberta', 'distilbert' or 'modernbert' (convert/modernbert.py), or a one-line
    ConfigError saying what has no counterpart."""
    options = [f'model.{o}' for o in non_bert_options(model_cfg) if not o.startswith('pooling')]
    if model_cfg.pre_layer_norm:
        options.append('model.pre_layer_norm=True')
    if options:
        why = modernbert.refusal(model_cfg, head)
        if why is not None:
            raise ConfigError(f'--workdir: {", ".join(options)}: no transformers BERT '
                              f'counterpart (BERT export needs these options at their '
                              f'defaults); {why}')
        kind = 'modernbert'
    elif model_cfg.export_as == 'distilbert':
        kind = 'distilbert'
    else:
        kind = 'roberta' if model_cfg.position_offset else 'bert'
    if head == 'classifier':
        check_classifier(kind, model_cfg)
    return kind


def check_classifier(kind: str, m: BertConfig) -> None:
    """A one-line ConfigError when the classifier's head or pooling is not the one of `kind`'s
    *ForSequenceClassification, naming the fine-tuning keys that give it."""
    want, poolings = CLASSIFIER_HEADS[kind]
    fix = []
    if m.classifier_head != want:
        fix.append(f'--config.model.classifier_head={want}')
    if m.pooling not in poolings:
        fix.append('--config.model.pooling=cls')
    if fix:
        raise ConfigError(
            f'--workdir: model.classifier_head={m.classifier_head!r}, model.pooling='
            f'{m.pooling!r}: {CLASSIFIER_CLASSES[kind]} has a {want} head on '
            f'{" or ".join(poolings)} pooling (no transformers class pools a {kind} encoder '
            f'otherwise); fine-tune with {" ".join(fix)} to export')


CLASSIFIER_CLASSES = {'bert': 'BertForSequenceClassification',
                      'roberta': 'RobertaForSequenceClassification',
                      'distilbert': 'DistilBertForSequenceClassification',
                      'modernbert': 'ModernBertForSequenceClassification'}


def hf_config(head: str, m: BertConfig, task: dict) -> dict:
    """transformers BertConfig fields for our model."""
    config = {
        'architectures': [ARCHITECTURES[head]], 'model_type': 'bert',
        'vocab_size': m.vocab_size, 'hidden_size': m.hidden_size,
        'num_hidden_layers': m.num_layers, 'num_attention_heads': m.num_heads,
        'intermediate_size': m.intermediate_size, 'hidden_act': 'gelu',  # exact erf GELU
        'hidden_dropout_prob': m.dropout_rate,
        'attention_probs_dropout_prob': m.attention_dropout_rate,
        'max_position_embeddings': m.max_position_embeddings,
        'type_vocab_size': m.type_vocab_size, 'initializer_range': m.initializer_range,
        'layer_norm_eps': m.layer_norm_eps, 'pad_token_id': PAD_ID,
        'position_embedding_type': 'absolute', 'tie_word_embeddings': True,
        'dtype': 'float32',
    }
    if head == 'token_classifier':
        labels = [str(n) for n in task['label_names']]
        config.update(id2label={str(i): n for i, n in enumerate(labels)},
                      label2id={n: i for i, n in enumerate(labels)})
    if head == 'classifier':
        config.update(label_fields(task))
    return config


def label_fields(task: dict) -> dict:
    """A classifier's config fields of its labels (regression: one output)."""
    if task.get('task') == 'regression':
        return {'num_labels': 1, 'problem_type': 'regression'}
    labels = [str(n) for n in task['label_names']]
    return {'problem_type': 'single_label_classification',
            'id2label': {str(i): n for i, n in enumerate(labels)},
            'label2id': {n: i for i, n in enumerate(labels)}}


def roberta_config(head: str, m: BertConfig, task: dict, ids: np.ndarray | None) -> dict:
    """transformers RobertaConfig fields: BERT's, RoBERTa's special ids; its padding_idx
    (pad_token_id) must be position_offset - 1, as its position ids count from it."""
    pad, cls, sep = (int(i) for i in (ids if ids is not None else np.arange(5))[
        [PAD_ID, CLS_ID, SEP_ID]])
    if m.position_offset != pad + 1:
        raise ConfigError(f'--workdir: model.position_offset={m.position_offset}: RoBERTa '
                          f'counts positions from its pad id + 1 = {pad + 1}')
    return {**hf_config(head, m, task), 'model_type': 'roberta',
            'architectures': [ROBERTA_ARCHITECTURES[head]], 'pad_token_id': pad,
            'bos_token_id': cls, 'eos_token_id': sep}


def electra_config(m: BertConfig, ids: np.ndarray | None) -> dict:
    """transformers ElectraConfig fields of the discriminator (embedding_size = hidden)."""
    config = {**hf_config('mlm', m, {}), 'model_type': 'electra',
              'architectures': [ELECTRA_ARCHITECTURE], 'embedding_size': m.hidden_size,
              'summary_type': 'first', 'summary_use_proj': True,
              'summary_activation': 'gelu', 'summary_last_dropout': 0.1}
    if ids is not None:
        config['pad_token_id'] = int(ids[PAD_ID])
    return config


def distilbert_config(m: BertConfig, ids: np.ndarray | None, head: str = 'mlm',
                      task: dict | None = None) -> dict:
    """transformers DistilBertConfig fields of our MLM or classifier (our pooler is its
    pre_classifier)."""
    if head == 'classifier':
        return {**distilbert_config(m, ids), **label_fields(task or {}),
                'architectures': [CLASSIFIER_CLASSES['distilbert']],
                'seq_classif_dropout': m.dropout_rate}
    return {'architectures': ['DistilBertForMaskedLM'], 'model_type': 'distilbert',
            'vocab_size': m.vocab_size, 'dim': m.hidden_size, 'n_layers': m.num_layers,
            'n_heads': m.num_heads, 'hidden_dim': m.intermediate_size, 'activation': 'gelu',
            'dropout': m.dropout_rate, 'attention_dropout': m.attention_dropout_rate,
            'max_position_embeddings': m.max_position_embeddings, 'sinusoidal_pos_embds': False,
            'initializer_range': m.initializer_range, 'tie_word_embeddings': True,
            'pad_token_id': int(ids[PAD_ID]) if ids is not None else PAD_ID,
            'dtype': 'float32'}


def _roberta_tensors(tensors: dict, head: str) -> dict:
    if head == 'classifier':
        tensors = {next((new + k[len(old):] for old, new in ROBERTA_CLASSIFIER
                         if k.startswith(old)), k): v for k, v in tensors.items()}
    return names.roberta_names(tensors)


def _restored_order(workdir: epath.Path, model_cfg: BertConfig
                    ) -> tuple[list[str], list[int]] | None:
    """(original vocabulary, our id -> original id) of an imported WordPiece BERT whose
    special tokens `import` moved to 0..4; None when our ids are the ones to export."""
    source = epath.Path(RunDir(workdir).tokenizer_file())
    if source.name != WORDPIECE_FILENAME:
        return None
    restored = hf_tokenizer_in.original_order(source, '--workdir')
    if restored is not None and model_cfg.vocab_size < len(restored[0]):
        raise ConfigError(f'--workdir: the model has {model_cfg.vocab_size} token rows for the '
                          f'{len(restored[0])}-piece vocabulary of the imported BERT (resized?);'
                          ' its original token ids cannot be restored')
    return restored


def _original_pipeline(source: epath.Path, vocab: list[str]):
    """Our WordPiece pipeline (same normalizer and pre-tokenizer) over the original ids."""
    from tokenizers import Tokenizer as HFTokenizer
    data = json.loads(source.read_text())
    data['model'].pop(hf_tokenizer_in.ORIGINAL_VOCAB, None)
    data['model']['vocab'] = {piece: i for i, piece in enumerate(vocab)}
    data['added_tokens'] = []  # re-added at the vocabulary's ids by write_hf_tokenizer
    return HFTokenizer.from_str(json.dumps(data))


def _write_tokenizer(workdir: epath.Path, out: pathlib.Path, max_len: int,
                     restored: tuple[list[str], list[int]] | None):
    """Our tokenizer file (copied) and the transformers tokenizer files (in the original id
    order for an imported BERT whose special tokens were moved); returns ours."""
    from tokenizers import Tokenizer as HFTokenizer
    source = epath.Path(RunDir(workdir).tokenizer_file())
    (out / source.name).write_bytes(source.read_bytes())
    special_ids = None
    original = (hf_tokenizer_in.original_pipeline(pathlib.Path(source))
                if source.name == WORDPIECE_FILENAME else None)
    if original is not None:  # an imported BPE: written back as it was
        tokenizer_files.write_original(*original, out, max_len)
        return load_tokenizer(str(out / source.name))
    if restored is not None:
        vocab, order = restored
        pipeline = _original_pipeline(source, vocab)
        (out / 'vocab.txt').write_text(''.join(f'{piece}\n' for piece in vocab),
                                       encoding='utf-8')
        special_ids = order[:len(SPECIAL_PIECES)]
    elif source.name == WORDPIECE_FILENAME:
        pipeline = HFTokenizer.from_str(source.read_text())
        vocab = sorted(pipeline.get_vocab().items(), key=lambda kv: kv[1])
        (out / 'vocab.txt').write_text(''.join(f'{piece}\n' for piece, _ in vocab),
                                       encoding='utf-8')
    else:
        pipeline = tokenizer_files.from_sentencepiece(source.read_bytes())
    tokenizer_files.write_hf_tokenizer(pipeline, out, max_len, special_ids=special_ids)
    return load_tokenizer(str(out / source.name))


def _write(workdir: epath.Path, out: pathlib.Path, step: int | None, check: bool) -> str:
    from safetensors.numpy import save_file
    head, model_cfg, params, task, step = load_workdir(workdir, step)
    if task.get('task') == 'embedding':
        return _write_sentence_transformers(workdir, out, model_cfg, params, step, check)
    kind = export_kind(head, model_cfg)
    if head == 'electra' and kind != 'bert':
        raise ConfigError(f'--workdir: an ELECTRA of {kind} layout has no transformers '
                          'counterpart (ElectraForPreTraining is a BERT encoder)')
    if kind == 'modernbert':
        return _write_modernbert(workdir, out, (head, task), model_cfg, params, step, check)
    restored = _restored_order(workdir, model_cfg)
    try:  # ELECTRA: the discriminator (transformers keeps the generator in another model)
        tensors = names.to_hf({k: v for k, v in params.items() if k != 'generator'},
                              model_cfg.num_layers, head)
    except (KeyError, ValueError) as e:
        raise ConfigError(f'--workdir: cannot map its parameters to transformers BERT: '
                          f'{e}') from None
    ids = None  # our id -> exported id
    if restored is not None:
        order = restored[1]
        ids = np.concatenate([order, np.arange(len(order), model_cfg.vocab_size)])
        tensors = hf_tokenizer_in.reorder_vocab(tensors, np.argsort(order).tolist())
    if kind == 'roberta':
        config = roberta_config(head, model_cfg, task, ids)
        tensors = _roberta_tensors(tensors, head)
    elif kind == 'distilbert':
        config = distilbert_config(model_cfg, ids, head, task)
        tensors = names.to_distilbert(tensors)
    elif head == 'electra':
        config = electra_config(model_cfg, ids)
        tensors = names.electra_names(tensors)
    else:
        config = hf_config(head, model_cfg, task)
        if ids is not None:
            config['pad_token_id'] = int(ids[PAD_ID])
    save_file(tensors, str(out / 'model.safetensors'), metadata={'format': 'pt'})
    (out / names.HF_CONFIG_FILENAME).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
    max_len = model_cfg.max_position_embeddings - model_cfg.position_offset
    tokenizer = _write_tokenizer(workdir, out, max_len, restored)
    if check:
        verify.verify(out, head, model_cfg, params, tokenizer, ids)
    return f'{config["architectures"][0]} (step {step})'


def _write_sentence_transformers(workdir: epath.Path, out: pathlib.Path,
                                 model_cfg: BertConfig, params: dict, step: int,
                                 check: bool) -> str:
    """An embedding run: BertModel + Pooling, as sentence-transformers lays them out."""
    encoder = dataclasses.replace(model_cfg, pooling='cls')  # pooling: the Pooling module's
    if export_kind('mlm', encoder) != 'bert' or _restored_order(workdir, model_cfg):
        raise ConfigError('--workdir: a sentence-transformers export needs a BERT-layout '
                          'encoder in this project\'s token ids (not RoBERTa, ModernBERT or '
                          'the modern recipe, nor an imported BERT with moved special tokens)')
    max_len = model_cfg.max_position_embeddings
    tokenizer = _write_tokenizer(workdir, out, max_len, None)
    seq_len = int(RunDir(workdir).read_config().get('seq_len', max_len))
    st_export.write(out, model_cfg, params, hf_config('mlm', encoder, {}), tokenizer, seq_len,
                    check)
    return f'a sentence-transformers model (BertModel + {model_cfg.pooling} pooling, step {step})'


def _write_modernbert(workdir: epath.Path, out: pathlib.Path, run: tuple[str, dict],
                      model_cfg: BertConfig, params: dict, step: int, check: bool) -> str:
    """ModernBertForMaskedLM, or ModernBertForSequenceClassification (`run`: head, task)."""
    from safetensors.numpy import save_file
    head, task = run
    restored = _restored_order(workdir, model_cfg)
    tensors = modernbert.to_hf(params, model_cfg, head)
    ids = np.arange(len(SPECIAL_PIECES))  # our id -> exported id (the special ones suffice)
    if restored is not None:  # an imported ModernBERT: its own token ids back
        order = restored[1]
        ids = np.concatenate([order, np.arange(len(order), model_cfg.vocab_size)])
        tensors = hf_tokenizer_in.reorder_vocab(tensors, np.argsort(order).tolist())
    save_file(tensors, str(out / 'model.safetensors'), metadata={'format': 'pt'})
    config = modernbert.hf_config(model_cfg, *(int(ids[i]) for i in (PAD_ID, CLS_ID, SEP_ID)),
                                  tied='decoder.weight' not in tensors)
    if head == 'classifier':
        config.update(label_fields(task), architectures=[CLASSIFIER_CLASSES['modernbert']],
                      classifier_pooling=model_cfg.pooling,
                      classifier_dropout=model_cfg.dropout_rate)
    (out / names.HF_CONFIG_FILENAME).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
    tokenizer = _write_tokenizer(workdir, out, model_cfg.max_position_embeddings, restored)
    if check:  # ModernBERT reads no token types: a pair's second segment is type 0 there too
        verify.verify(out, head, model_cfg, params, tokenizer,
                      ids if restored is not None else None, token_types=False)
    return f'{config["architectures"][0]} (step {step})'


def run(workdir: str, output: str, step: int | None = None, check: bool = True) -> None:
    """Exports `workdir` to `output` (which must not exist yet)."""
    local_file_argument(output, '--output', 'export')
    source, target = absolute_path(workdir), pathlib.Path(output).absolute()
    if target.exists():
        raise ConfigError(f'--output: {output} exists; remove it or choose another path')
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{target.name}.tmp-', dir=target.parent))
    try:
        what = _write(source, tmp, step, check)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        tmp.rename(target)
    except verify.VerificationError as e:
        raise ConfigError(f'export verification failed: {e}; nothing was written') from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f'exported {what} of {workdir} to {output}', flush=True)
