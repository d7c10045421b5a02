"""Token classification and extractive QA end to end through `launch.py`: fine-tune from a
tiny pretrained run, predict, export to transformers with logit parity."""

import json

import numpy as np
import pytest

import launch
from finetune import span_metrics
from tests.helpers import ADJECTIVES, NOUNS, PLACES, REPO, VERBS

pytestmark = pytest.mark.slow


def _tagged(rng) -> tuple[list[str], list[str]]:
    """'the ADJ NOUN VERB PLACE the NOUN .': subject and object phrases as BIO spans."""
    words = ['the', rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS),
             rng.choice(PLACES), 'the', rng.choice(NOUNS), '.']
    return words, ['B-SUBJ', 'I-SUBJ', 'I-SUBJ', 'O', 'O', 'B-OBJ', 'I-OBJ', 'O']


def _qa_paragraph(rng, k: int) -> dict:
    """Three sentences with distinct subjects; each question asks what one of them did."""
    nouns = rng.choice(NOUNS, 3, replace=False)
    parts = [f'the {n} {rng.choice(VERBS)} {rng.choice(PLACES)} the {rng.choice(NOUNS)} .'
             for n in nouns]
    context = ' '.join(parts)
    qas = []
    for i, n in enumerate(nouns):
        at = sum(len(p) + 1 for p in parts[:i]) + len(f'the {n} ')
        verb = parts[i].split()[2]
        assert context[at:at + len(verb)] == verb
        qas.append({'id': f'{k}-{i}', 'question': f'what did the {n} do ?',
                    'answers': [{'text': verb, 'answer_start': at}]})
    return {'context': context, 'qas': qas}


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp('spans')
    rng = np.random.default_rng(0)
    with open(root / 'train.conll', 'w') as f:
        for _ in range(240):
            f.write(''.join(f'{w} {t}\n' for w, t in zip(*_tagged(rng), strict=True)) + '\n')
    with open(root / 'dev.jsonl', 'w') as f:
        for _ in range(32):
            words, tags = _tagged(rng)
            f.write(json.dumps({'tokens': words, 'labels': tags}) + '\n')
    for name, n in (('train', 40), ('dev', 12)):
        doc = {'data': [{'title': name, 'paragraphs': [_qa_paragraph(rng, k) for k in range(n)]}]}
        (root / f'{name}.json').write_text(json.dumps(doc))
    return {k: str(root / k) for k in ('train.conll', 'dev.jsonl', 'train.json', 'dev.json')}


def _finetune(workdir, pretrained_run, task: str, train: str, dev: str, *extra: str,
              epochs: int = 4) -> dict:
    args = ['finetune', '--config', f'{REPO}/configs/finetune.py:custom', '--workdir',
            str(workdir), f'--config.init_from={pretrained_run}', f'--config.task={task}',
            f'--config.data.train_file={train}', f'--config.data.validation_file={dev}',
            f'--config.num_epochs={epochs}', '--config.batch_size=16',
            '--config.learning_rate=3e-3',
            '--config.model.dropout_rate=0', '--config.log_every_steps=20', *extra]
    assert launch.main(args) == 0
    return json.loads((workdir / 'results.json').read_text())


def _export(workdir, tmp_path, capsys) -> dict:
    assert launch.main(['export', '--workdir', str(workdir), '--output',
                        str(tmp_path / 'hf')]) == 0
    out = capsys.readouterr().out
    diff = float(out.split('max |logit diff|: ')[1].split()[0])
    assert diff <= 1e-4  # export's verification ran against transformers
    return json.loads((tmp_path / 'hf' / 'config.json').read_text())


def test_token_classification_learns_predicts_and_exports(tmp_path, pretrained_run, files,
                                                          capsys):
    workdir = tmp_path / 'ft'
    results = _finetune(workdir, pretrained_run, 'token_classification', files['train.conll'],
                        files['dev.jsonl'], '--config.seq_len=32')
    val = results['validation']
    assert results['label_names'] == ['O', 'B-OBJ', 'B-SUBJ', 'I-OBJ', 'I-SUBJ']
    assert val['f1'] > 0.8 and val['words'] == 32 * 8  # the phrases follow the template
    metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    assert any('eval_f1' in m for m in metrics)
    out = tmp_path / 'pred.jsonl'
    assert launch.main(['predict', '--workdir', str(workdir), '--input', files['dev.jsonl'],
                        '--output', str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    gold = [json.loads(line) for line in open(files['dev.jsonl'])]
    assert [r['tokens'] for r in rows] == [g['tokens'] for g in gold]
    # predict labels the words exactly as the run's evaluation did
    again = span_metrics.token_metrics([g['labels'] for g in gold], [r['labels'] for r in rows])
    assert again['f1'] == pytest.approx(val['f1']) and again['accuracy'] == val['accuracy']
    capsys.readouterr()
    config = _export(workdir, tmp_path, capsys)
    assert config['architectures'] == ['BertForTokenClassification']
    assert config['id2label']['2'] == 'B-SUBJ'


def test_extractive_qa_windows_predicts_and_exports(tmp_path, pretrained_run, files, capsys):
    workdir = tmp_path / 'qa'
    # seq_len 32 with doc_stride 8: every context (about 30 subwords) spans several windows
    results = _finetune(workdir, pretrained_run, 'extractive_qa', files['train.json'],
                        files['dev.json'], '--config.seq_len=32', '--config.data.doc_stride=8',
                        '--config.data.max_answer_length=3', epochs=2)
    val = results['validation']
    assert val['questions'] == 36 and 0.0 <= val['exact_match'] <= val['f1'] <= 1.0
    out = tmp_path / 'answers.jsonl'
    assert launch.main(['predict', '--workdir', str(workdir), '--input', files['dev.json'],
                        '--output', str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    doc = json.loads(open(files['dev.json']).read())
    golds = [[a['text'] for a in q['answers']] for p in doc['data'][0]['paragraphs']
             for q in p['qas']]
    assert all(len(r['answer'].split()) <= 3 for r in rows)
    again = span_metrics.squad_metrics([r['answer'] for r in rows], golds)
    assert again['exact_match'] == pytest.approx(val['exact_match'])
    assert again['f1'] == pytest.approx(val['f1'])
    capsys.readouterr()
    config = _export(workdir, tmp_path, capsys)
    assert config['architectures'] == ['BertForQuestionAnswering']
