"""A progress line for long work (corpus preparation, predictions): rate and ETA.

On a terminal the line is redrawn in place every second; in a log file a full line is
written every 30 seconds, so logs stay short. Always to stderr.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Progress:
    """Shows `label: done/total unit (pct) rate, extra, ETA` while `read()` grows.

    `read` returns (done, extra_count) and is polled from a thread; `extra_name` names the
    second count (e.g. 'docs'). Use as a context manager.
    """

    def __init__(self, label: str, total: float, read: Callable[[], tuple[float, float]],
                 unit: str = 'MB', scale: float = 1e6, extra_name: str = '',
                 enabled: bool = True, stream=None):
        self.label, self.total, self.read = label, total, read
        self.unit, self.scale, self.extra_name = unit, scale, extra_name
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._tty = bool(getattr(self.stream, 'isatty', lambda: False)())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.time()

    def line(self) -> str:
        done, extra = self.read()
        elapsed = max(time.time() - self._start, 1e-9)
        rate = done / elapsed
        pct = f' ({100 * done / self.total:.0f}%)' if self.total else ''
        eta = _clock((self.total - done) / rate) if rate > 0 and self.total else '?'
        more = f', {extra / elapsed:,.0f} {self.extra_name}/s' if self.extra_name else ''
        return (f'{self.label}: {done / self.scale:,.0f}/{self.total / self.scale:,.0f} '
                f'{self.unit}{pct} {rate / self.scale:,.1f} {self.unit}/s{more}, ETA {eta}')

    def _loop(self) -> None:
        interval = 1.0 if self._tty else 30.0
        while not self._stop.wait(interval):
            self._show()

    def _show(self, end: str = '') -> None:
        text = self.line()
        if self._tty:
            self.stream.write('\r' + text + '\x1b[K' + end)
        else:
            self.stream.write(text + '\n')
        self.stream.flush()

    def __enter__(self) -> Progress:
        self._start = time.time()
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name='progress', daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            if self._tty:
                self._show(end='\n')
