"""The progress of long work: a tqdm bar on a terminal (share done, rate, ETA), a plain
line every 30 s in logs."""

import io
import re

from engine.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_on_a_terminal_and_quiet_in_short_logs():
    done = [0, 0]
    screen = Terminal()
    with Progress('prepare', 2e6, lambda: tuple(done), extra_name='docs', stream=screen):
        done[:] = [1e6, 500]
    # the bar as last drawn (tqdm pads a redraw shorter than the one before with spaces)
    last = screen.getvalue().split('\r')[-1].rstrip()
    assert last.startswith('prepare:  50%|') and '| 1/2 MB [' in last, last
    assert re.search(r'\[00:0\d<00:0\d, [\d.]+MB/s, [\d,]+ docs/s\]$', last), last
    assert screen.getvalue().endswith('\n')  # closed: the cursor is on a new line
    assert Progress('x', 4e6, lambda: (1e6, 0)).line().startswith('x: 1/4 MB (25%) ')
    log = io.StringIO()  # not a terminal: a line every 30 s only, so nothing for short work
    with Progress('predict', 10, lambda: (10, 0), unit='examples', scale=1, stream=log):
        pass
    assert log.getvalue() == ''
