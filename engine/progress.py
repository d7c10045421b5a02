"""Progress of long work (corpus preparation, predictions): share done, rate and ETA.

On a terminal it is a tqdm bar, the same style as the training bar (engine/loop.py),
redrawn every second from a polling thread; in a log file a plain line is written every 30
seconds instead, so logs stay short. Always to stderr.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import tqdm

BAR_FORMAT = ('{desc}: {percentage:3.0f}%|{bar}| {n:,.0f}/{total:,.0f} {unit} '
              '[{elapsed}<{remaining}, {rate_fmt}{postfix}]')


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
        self._bar: tqdm.tqdm | None = None
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

    def _show(self) -> None:
        if self._bar is None:
            self.stream.write(self.line() + '\n')
            self.stream.flush()
            return
        done, extra = self.read()
        self._bar.n = done / self.scale
        if self.extra_name:
            elapsed = max(time.time() - self._start, 1e-9)
            self._bar.set_postfix_str(f'{extra / elapsed:,.0f} {self.extra_name}/s',
                                      refresh=False)
        self._bar.refresh()

    def __enter__(self) -> Progress:
        self._start = time.time()
        if self.enabled:
            if self._tty:
                self._bar = tqdm.tqdm(total=self.total / self.scale, desc=self.label,
                                      unit=self.unit, file=self.stream, dynamic_ncols=True,
                                      bar_format=BAR_FORMAT, mininterval=0)
            self._thread = threading.Thread(target=self._loop, name='progress', daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._bar is not None:
            self._show()  # the final count
            self._bar.close()
