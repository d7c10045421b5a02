"""The progress line of long work: rate, share done and ETA, redrawn on a terminal."""

import io

from engine.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_on_a_terminal_and_quiet_in_short_logs():
    done = [0, 0]
    screen = Terminal()
    with Progress('prepare', 2e6, lambda: tuple(done), extra_name='docs', stream=screen):
        done[:] = [1e6, 500]
    text = screen.getvalue()
    assert text.startswith('\rprepare: 1/2 MB (50%) ') and ' MB/s, ' in text
    assert 'docs/s, ETA 0:00:0' in text and text.endswith('\n')
    log = io.StringIO()  # not a terminal: a line every 30 s only, so nothing for short work
    with Progress('predict', 10, lambda: (10, 0), unit='examples', scale=1, stream=log):
        pass
    assert log.getvalue() == ''
