"""studies/compute_curve.py: compute read from a checkpoint, averages from a bench table."""

import csv
import json
import math

import pytest

from engine.config_cli import read_run_config
from engine.rundir import RunDir
from models.bert import BertForMaskedLM
from models.config import BertConfig
from pretrain import objective
from studies import compute_curve

REGIME = compute_curve.REGIME


def _bench(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    with (path / 'results_tasks.csv').open('w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['regime', 'method', 'task', 'metric', 'mean', 'std', 'seeds'])
        w.writerows(rows)
    return str(path)


def test_parse_point_and_its_errors():
    assert compute_curve.parse_point('m,runs/a@1050,runs/b,finetune') == (
        'm', 'runs/a', 1050, 'runs/b', 'finetune')
    assert compute_curve.parse_point('m, none ,b,scratch')[1:3] == ('none', None)
    with pytest.raises(ValueError, match='expected SERIES'):
        compute_curve.parse_point('m,a,b')
    with pytest.raises(ValueError, match='@STEP must be a number'):
        compute_curve.parse_point('m,a@x,b,finetune')


def test_bench_average_reads_the_regime_row(tmp_path):
    bench = _bench(tmp_path / 'b', [
        ['all labels', 'finetune', 'average', 'mean', 0.9, 0.01, 3],
        [REGIME, 'finetune', 'trec_1k', 'f1', 0.5, 0.1, 3],
        [REGIME, 'finetune', 'average', 'mean', 0.61, 0.02, 3]])
    assert compute_curve.bench_average(bench, 'finetune') == (0.61, 0.02, 3)
    with pytest.raises(ValueError, match="no 'probe' average"):
        compute_curve.bench_average(bench, 'probe')
    with pytest.raises(ValueError, match='no results_tasks.csv'):
        compute_curve.bench_average(str(tmp_path / 'nothing'), 'finetune')


def test_curve_of_a_real_checkpoint(tmp_path, pretrained_run):
    bench = _bench(tmp_path / 'b', [
        [REGIME, 'scratch', 'average', 'mean', 0.60, 0.02, 3],
        [REGIME, 'finetune', 'average', 'mean', 0.64, 0.01, 3],
        [REGIME, 'tfidf', 'average', 'mean', 0.69, 0.0, 3]])
    compute_curve.main(['--out', str(tmp_path / 'out'), '--point', f'x,none,{bench},scratch',
                        '--point', f'x,{pretrained_run},{bench},finetune'])
    rows = list(csv.DictReader((tmp_path / 'out' / 'compute_curve.csv').open()))
    assert [float(r['mean']) for r in rows] == [0.60, 0.64]
    assert (rows[0]['steps'], rows[0]['flops']) == ('0', '0.0')
    cfg = read_run_config(pretrained_run)
    steps = RunDir(pretrained_run).latest_step()
    model = BertForMaskedLM(BertConfig(**cfg.model.to_dict()))
    masked = cfg.masking.max_predictions or math.ceil(cfg.masking.mask_rate * cfg.seq_len)
    assert int(rows[1]['steps']) == steps
    assert int(rows[1]['tokens']) == steps * cfg.batch_size * cfg.seq_len
    assert float(rows[1]['flops']) == pytest.approx(
        steps * objective.flops_per_step(model, cfg.batch_size, cfg.seq_len, masked))
    assert float(rows[1]['minutes']) > 0
    logged = [json.loads(x) for x in RunDir(pretrained_run).metrics_file.read_text().splitlines()]
    final_eval = [r['eval_loss'] for r in logged if r.get('step') == steps and 'eval_loss' in r]
    assert float(rows[1]['eval_loss']) == pytest.approx(final_eval[-1])
    table = (tmp_path / 'out' / 'compute_curve.md').read_text()
    assert '| TF-IDF (no pretraining) | | | | | | 0.690 |' in table
