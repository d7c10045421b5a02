"""Curves as pictures: curves.png redrawn from metrics.jsonl, `launch.py plot` overlaying
runs, and TensorBoard's config text."""

import json
import pathlib
import sys

import pytest

pytest.importorskip('matplotlib', reason='the [plots] extra draws the pictures')

import launch  # noqa: E402
from engine import curves  # noqa: E402
from engine.metrics_writer import MetricWriter  # noqa: E402
from tests.helpers import tensorboard_events  # noqa: E402

PNG = b'\x89PNG\r\n\x1a\n'


def _write_run(path: pathlib.Path, scale: float) -> None:
    path.mkdir(parents=True)
    writer = MetricWriter(str(path), run_config={'seed': 0, 'model': {'num_layers': 2}})
    for step in range(1, 7):
        writer.write(step, {'loss': scale * (8 - step), 'learning_rate': 1e-3 * step})
        if step % 3 == 0:
            writer.write(step, {'eval_loss': scale * (9 - step), 'eval_accuracy': step / 10})
    writer.close()


def test_a_run_draws_its_curves_from_metrics_jsonl(tmp_path):
    _write_run(tmp_path / 'run', 1.0)
    picture = tmp_path / 'run' / curves.CURVES_FILENAME
    assert picture.read_bytes()[:8] == PNG
    records = curves.read_records(tmp_path / 'run' / 'metrics.jsonl')
    assert curves.series(records, 'eval_loss') == ([3, 6], [6.0, 3.0])
    assert curves.eval_metric_keys(records) == ['eval_accuracy']
    assert not list((tmp_path / 'run').glob('.*tmp*'))  # drawn beside, then renamed


def _event_texts(directory: pathlib.Path) -> dict[str, str]:
    """tag -> text of the text summaries in the event files."""
    texts = {}
    for event in tensorboard_events(directory):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == 'text':
                texts[value.tag] = value.tensor.string_val[0].decode()
    return texts


def test_the_config_is_text_in_tensorboard(tmp_path):
    _write_run(tmp_path / 'run', 1.0)
    texts = _event_texts(tmp_path / 'run' / 'tensorboard')
    text = next(v for k, v in texts.items() if k.startswith('config'))
    body = text.split('```json\n', 1)[1].rsplit('\n```', 1)[0]
    assert json.loads(body) == {'seed': 0, 'model': {'num_layers': 2}}


def test_plot_overlays_two_runs_and_refuses_a_missing_key(tmp_path, capsys):
    _write_run(tmp_path / 'bert', 1.0)
    _write_run(tmp_path / 'modern', 0.5)
    out = tmp_path / 'both.png'
    assert launch.main(['plot', str(tmp_path / 'bert'), str(tmp_path / 'modern'),
                        '--output', str(out), '--keys', 'loss,eval_accuracy']) == 0
    assert out.read_bytes()[:8] == PNG
    assert launch.main(['plot', str(tmp_path / 'bert'), '--keys', 'eval_f1',
                        '--output', str(out)]) == 2
    assert "no run logged 'eval_f1'" in capsys.readouterr().err
    assert launch.main(['plot', str(tmp_path / 'nothing'), '--output', str(out)]) == 2


def test_without_matplotlib_runs_go_on_and_plot_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    _write_run(tmp_path / 'run', 1.0)
    assert not (tmp_path / 'run' / curves.CURVES_FILENAME).exists()
    assert json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()[0])['step'] == 1
    assert launch.main(['plot', str(tmp_path / 'run')]) == 2
    assert 'needs the optional extra [plots]' in capsys.readouterr().err
