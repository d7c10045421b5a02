"""Token-classification and QA data: reading, bad inputs, first-subword labels, windows."""

import json
import logging

import numpy as np
import pytest

import launch
from finetune import qa, tokens
from tests.helpers import REPO, make_sentences, small_tokenizer


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp('tok'))


def test_conll_and_jsonl_read_alike(tmp_path):
    (tmp_path / 'a.conll').write_text('-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\n'
                                      'rejects VBZ B-VP O\n\n\nPeter B-PER\n')
    (tmp_path / 'a.jsonl').write_text(
        json.dumps({'tokens': ['EU', 'rejects'], 'labels': ['B-ORG', 'O']}) + '\n\n'
        + json.dumps({'tokens': ['Peter'], 'labels': ['B-PER']}) + '\n')
    conll = tokens.read_sentences(str(tmp_path / 'a.conll'))
    jsonl = tokens.read_sentences(str(tmp_path / 'a.jsonl'))
    assert [(r['words'], r['tags']) for r in conll] == [(r['words'], r['tags']) for r in jsonl]
    assert [r['line'] for r in conll] == [3, 7]
    assert conll[0]['tags'] == ['B-ORG', 'O']  # the last field of CoNLL-2003's four


@pytest.mark.parametrize('name, text, message', [
    ('bad.jsonl', '{"tokens": ["a"], "labels": ["O"]}\n{"tokens": ["a", "b"], "labels": ["O"]}\n',
     r'bad.jsonl, line 2: 2 tokens but 1 labels'),
    ('bad.conll', 'a O\nb O\n\nlonely\n', r'bad.conll, line 4: expected "word label"'),
    ('bad.jsonl', '{"tokens": "a b", "labels": ["O"]}\n', r"line 1: 'tokens': expected a list"),
    ('bad.conll', '\n\n', r'no sentences'),
])
def test_bad_token_files_name_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        tokens.read_sentences(str(tmp_path / name))


def test_bad_file_is_one_error_line_from_launch(tmp_path, capsys):
    (tmp_path / 'bad.jsonl').write_text('{"tokens": ["a", "b"], "labels": ["O"]}\n')
    code = launch.main(['finetune', '--config', f'{REPO}/configs/finetune.py:custom', '--workdir',
                        str(tmp_path / 'run'), '--config.init_from=none',
                        '--config.task=token_classification',
                        f'--config.data.train_file={tmp_path / "bad.jsonl"}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith('error: data: ') and 'line 1: 2 tokens but 1' in err[-1]
    assert not (tmp_path / 'run' / 'config.json').exists()


def test_validation_tag_unseen_in_training_is_refused(tmp_path):
    (tmp_path / 't.conll').write_text('a O\nb B-X\n\nc O\n')
    (tmp_path / 'v.conll').write_text('a O\n\nb B-NEW\n')
    with pytest.raises(ValueError, match=r'v.conll, line 3: label .B-NEW.'):
        tokens.load_task(str(tmp_path / 't.conll'), str(tmp_path / 'v.conll'))


@pytest.mark.parametrize('seed', range(4))
def test_a_tag_held_out_or_subsampled_away_is_still_a_class(tmp_path, seed):
    (tmp_path / 't.conll').write_text(''.join(f'w{i} O\n\n' for i in range(9)) + 'r B-RARE\n')
    for kwargs in ({'validation_fraction': 0.3}, {'max_train_examples': 2}):
        task = tokens.load_task(str(tmp_path / 't.conll'), seed=seed, **kwargs)
        assert task['label_names'] == ['O', 'B-RARE']
        assert sum(len(task[s]) for s in ('train', 'validation')) <= 10


def test_first_subword_labels_and_word_predictions_round_trip(tokenizer):
    words = [s.split() for s in make_sentences(12, seed=4)]
    names = ['O', 'B-X', 'I-X']
    rng = np.random.default_rng(0)
    tags = [[names[i] for i in rng.integers(0, 3, len(w))] for w in words]
    examples = tokens.TokenExamples(words, tags, list(range(len(words))))
    encoded = tokens.encode(tokenizer, examples, 24, names)
    for row, ws in enumerate(words):
        ids, at, kept = encoded['input_ids'][row], 1, 0
        for j, word in enumerate(ws):
            pieces = tokenizer.encode(word)
            if at + len(pieces) > 23:
                break
            assert list(ids[at:at + len(pieces)]) == pieces  # the word's own pieces, in place
            assert encoded['labels'][row, at] == names.index(tags[row][j])
            assert (encoded['labels'][row, at + 1:at + len(pieces)] == tokens.IGNORE).all()
            at, kept = at + len(pieces), kept + 1
        assert (encoded['labels'][row] >= 0).sum() == kept
        assert encoded['attention_mask'][row].sum() == at + 1  # [CLS] ... [SEP]
    cut = sum(len(w) for w in words) - int((encoded['labels'] >= 0).sum())
    assert cut > 0  # seq_len 24 cuts some sentences: their last words are predicted 'O'
    back = tokens.word_predictions(np.maximum(encoded['labels'], 0), encoded['labels'],
                                   examples, names)
    for row, ws in enumerate(words):
        kept = int((encoded['labels'][row] >= 0).sum())
        assert back[row] == tags[row][:kept] + ['O'] * (len(ws) - kept)


def _squad(path, paragraphs):
    path.write_text(json.dumps({'version': '1.1', 'data': [{'title': 't',
                                                            'paragraphs': paragraphs}]}))
    return str(path)


def test_answers_not_at_their_start_are_skipped_with_one_line(tmp_path, caplog):
    ctx = 'Kalo went to Lodovi in 1990. Then he left.'
    path = _squad(tmp_path / 'q.json', [{'context': ctx, 'qas': [
        {'id': 'good', 'question': 'When?', 'answers': [{'text': '1990',
                                                           'answer_start': ctx.index('1990')}]},
        {'id': 'bad', 'question': 'Where?', 'answers': [{'text': 'Lodovi', 'answer_start': 3}]},
        {'id': 'mixed', 'question': 'Who?', 'answers': [{'text': 'Kalo', 'answer_start': 0},
                                                         {'text': 'Kalo', 'answer_start': 9}]},
    ]}])
    with caplog.at_level(logging.WARNING):
        rows = qa.read_questions(path)
    assert [r['id'] for r in rows] == ['good', 'mixed']
    assert rows[1]['answers'] == ['Kalo'] and rows[1]['start'] == 0
    assert "skipped 2 answers whose text is not at their answer_start (first: question 'bad')" \
        in caplog.text
    assert 'skipped 1 questions left without an answer' in caplog.text
    bad = _squad(tmp_path / 'b.json', [{'context': ctx, 'qas': [
        {'id': 'x', 'question': 'Where?', 'answers': [{'text': 'Lodovi', 'answer_start': 1}]}]}])
    with pytest.raises(ValueError, match='b.json: no answerable questions'):
        qa.read_questions(bad)


def test_hf_jsonl_layout_reads_as_squad(tmp_path):
    ctx = 'The hat of Tera is blue.'
    (tmp_path / 'q.jsonl').write_text(json.dumps({
        'id': 'a', 'context': ctx, 'question': 'What colour?',
        'answers': {'text': ['blue'], 'answer_start': [ctx.index('blue')]}}) + '\n')
    assert qa.read_questions(str(tmp_path / 'q.jsonl'))[0]['answers'] == ['blue']


def test_offsets_are_the_characters_of_each_subword(tokenizer):
    context = '  '.join(make_sentences(3, seed=9))
    ids, spans = qa.context_tokens(tokenizer, context)
    assert len(ids) == len(spans)
    pieces = [tokenizer.id_to_piece(i).removeprefix('\u2581') for i in ids]
    assert [context[a:b] for a, b in spans] == pieces  # this BPE spells its words exactly
    assert (spans[1:, 0] >= spans[:-1, 1]).all()


def test_windows_cover_the_context_and_the_target_decodes_to_the_answer(tokenizer):
    context = ' '.join(make_sentences(8, seed=2))
    words = context.split()
    answer = ' '.join(words[30:33])
    start = context.index(answer)
    ex = qa.QAExamples(['q'], ['What is it?'], [context], [[answer]], [start], [answer])
    encoded = qa.encode(tokenizer, ex, 32, 8)
    n_ids = len(qa.context_tokens(tokenizer, context)[0])
    assert len(encoded['input_ids']) > 2  # a long context: several windows
    seen = np.zeros(n_ids, bool)
    holding = 0
    for w in range(len(encoded['input_ids'])):
        first, last = encoded['start_positions'][w], encoded['end_positions'][w]
        off = encoded['offsets'][w]
        ctx_cols = np.flatnonzero(off[:, 0] >= 0)
        assert (encoded['token_type_ids'][w, ctx_cols] == 1).all()
        if first:
            holding += 1
            assert context[off[first, 0]:off[last, 1]] == answer
        # one-hot logits at the target give the answer back through best_spans
        logits = np.zeros((1, 32, 2), np.float32)
        logits[0, first, 0] = logits[0, last, 1] = 10.0
        one = {k: v[w:w + 1] for k, v in encoded.items()}
        if first:
            assert qa.best_spans(logits, one, ex, 30)[0][0] == answer
        seen[np.searchsorted(qa.context_tokens(tokenizer, context)[1][:, 0],
                             off[ctx_cols, 0])] = True
    assert seen.all() and holding >= 1  # every context token is in some window


def test_best_span_respects_max_answer_length_and_order(tokenizer):
    context = 'alpha beta gamma delta epsilon'
    ex = qa.QAExamples(['q'], ['Which?'], [context], [['beta']], [6], ['beta'])
    encoded = qa.encode(tokenizer, ex, 48, 0)
    cols = np.flatnonzero(encoded['offsets'][0, :, 0] >= 0)
    logits = np.full((1, 48, 2), -10.0, np.float32)
    logits[0, cols[-1], 0] = 9.0  # the best start is after the best end: not a span
    logits[0, cols[0], 1] = 9.0
    logits[0, cols[1], 0] = logits[0, cols[2], 1] = 1.0
    text, score = qa.best_spans(logits, encoded, ex, 30)[0]
    off = encoded['offsets'][0]
    assert (text, score) == (context[off[cols[1], 0]:off[cols[2], 1]], 2.0)
    logits[0, cols[1], 1] = 1.5  # a one-token span now beats the two-token one ...
    assert qa.best_spans(logits, encoded, ex, 30)[0][1] == 2.5
    logits[0, cols[1], 1] = -10.0
    # ... and with max_answer_length 1 the two-token span is out: the best single token
    assert qa.best_spans(logits, encoded, ex, 1)[0][1] == -1.0


def test_bad_qa_option_and_metric_are_one_line(tmp_path, capsys):
    (tmp_path / 'q.json').write_text(json.dumps({'data': []}))
    base = ['finetune', '--config', f'{REPO}/configs/finetune.py:custom', '--workdir',
            str(tmp_path / 'x'), '--config.init_from=none',
            '--config.task=extractive_qa', f'--config.data.train_file={tmp_path / "q.json"}']
    assert launch.main([*base, '--config.metric=accuracy']) == 2
    assert "error: metric: 'accuracy': task=extractive_qa reports ['f1', 'exact_match']" in \
        capsys.readouterr().err
    assert launch.main([*base, '--config.augment.mask=0.1']) == 2
    assert 'error: augment: task=extractive_qa cannot augment' in capsys.readouterr().err


@pytest.mark.parametrize('task, name', [('token_classification', 'a.conll'),
                                        ('extractive_qa', 'q.json')])
def test_dry_run_sizes_both_tasks_and_writes_nothing(tmp_path, capsys, task, name):
    (tmp_path / 'a.conll').write_text('a O\nb B-X\n\nc O\nd I-X\n')
    ctx = 'The hat of Tera is blue. The boat is red.'
    _squad(tmp_path / 'q.json', [{'context': ctx, 'qas': [
        {'id': str(i), 'question': 'What colour?', 'answers': [
            {'text': c, 'answer_start': ctx.index(c)}]} for i, c in enumerate(('blue', 'red'))]}])
    code = launch.main(['finetune', '--config', f'{REPO}/configs/finetune.py:custom',
                        '--workdir', str(tmp_path / 'run'), '--config.init_from=none',
                        f'--config.task={task}', f'--config.data.train_file={tmp_path / name}',
                        '--config.model.num_layers=1', '--dry-run'])
    assert code == 0 and 'flops/step' in capsys.readouterr().out
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('name, text, message', [
    ('q.json', '{"data": 3}', r'q.json: expected SQuAD JSON: an object with a "data" list'),
    ('q.json', '{"data": [{"paragraphs": [{"context": "x", "qas": ["oops"]}]}]}',
     r'q.json: data\[0\]: expected'),
    ('q.json', '{"data": [', r'q.json, line 1: not valid JSON'),
    ('q.json', '{"data": [{"paragraphs": [{"context": " ", "qas": [{"id": "a", "question": "?",'
     ' "answers": []}]}]}]}', r"question 'a': empty or missing 'context'"),
    ('q.jsonl', '{"id": "a", "context": "x y", "question": "?", "answers": {"text": ["x"]}}',
     r'q.jsonl, line 1: 1 answer texts but 0 answer_start values'),
])
def test_bad_squad_files_are_one_line_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        qa.read_questions(str(tmp_path / name))
