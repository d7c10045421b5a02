"""pretrain/benchmark_data.py end to end on a ~2 MB corpus: every number measured and positive."""

import json
import math

import pytest

from pretrain import benchmark_data


@pytest.mark.slow
def test_benchmark_data_small_corpus(tmp_path, capsys):
    assert benchmark_data.main(['--size-mb', '2', '--workdir', str(tmp_path), '--steps', '10']) == 0
    result = json.loads((tmp_path / 'benchmark_data.json').read_text())
    (row,) = result['rows']
    for key, value in row.items():
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, key
    assert row['size_mb'] == 2
    assert abs(row['corpus_bytes'] - 2 * benchmark_data.MB) < 4096  # ends at a line
    assert math.isclose(row['ratio'], row['prep_mb_s'] / row['raw_spm_mb_s'])
    assert row['startup_s'] < row['train_s']
    assert (tmp_path / 'size-2mb' / 'spm.model').read_bytes() == \
        (tmp_path / 'spm.model').read_bytes()
    table = capsys.readouterr().out
    assert 'prep MB/s' in table and 'largest/smallest' not in table  # one size: no ratios
