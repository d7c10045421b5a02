"""metrics.jsonl on resume: lines after the checkpoint go, a torn line does not block it."""

import json

from engine.metrics_writer import MetricWriter


def test_a_torn_last_line_is_dropped_with_a_warning_and_the_run_resumes(tmp_path, capsys):
    lines = [json.dumps({'step': s, 'loss': 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 4, "lo')
    writer = MetricWriter(str(tmp_path), resume_step=2)
    writer.write(3, {'loss': 0.25})
    writer.close()
    records = [json.loads(x) for x in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records] == [1, 2, 3] and records[-1]['loss'] == 0.25
    assert 'dropped 1 unreadable line(s)' in capsys.readouterr().err
