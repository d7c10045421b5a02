"""The format benchmark runs at a tiny size, so its command is known to work."""

import pytest

from pretrain import format_bench


@pytest.mark.slow
def test_format_bench_prints_each_format_against_raw_sentencepiece(tmp_path, capsys):
    args = ['--size-mb', '0.3', '--workdir', str(tmp_path), '--repeats', '1']
    assert format_bench.main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith('| ') and 'MB/s' not in line]
    assert [row.split(' | ')[0][2:] for row in rows] == list(format_bench.FORMATS)
    for row in rows:
        cells = row.strip('| ').split(' | ')
        assert float(cells[2]) > 0 and float(cells[4]) > 0 and cells[5] in ('met', 'missed')
    assert 'raw sentencepiece:' in out
