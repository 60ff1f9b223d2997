"""Progress lines for long work: done / total, rate, time left, throttled, on the `dede` logger (the CLI prints
them on stderr, a flow sends them to its Prefect run log)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("dede")


def format_seconds(seconds: float) -> str:
    """12.3 -> '12s', 125 -> '2m05s', 7300 -> '2h01m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts units of work and prints a line at most every `interval` seconds, and once at the end."""

    def __init__(
        self, total: int, *, desc: str, unit: str = "img", interval: float = 5.0, quiet: bool = False
    ) -> None:
        self.total, self.desc, self.unit, self.interval, self.quiet = total, desc, unit, interval, quiet
        self.done = 0
        self.start = time.perf_counter()
        self._last_print = self.start

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, extra: str = "") -> str:
        rate = self.rate
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = format_seconds(left) if left == left else "?"
        text = f"{self.desc} {self.done}/{self.total} {self.unit} | {rate:.1f} {self.unit}/s | left {eta}"
        return f"{text} | {extra}" if extra else text

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last_print >= self.interval:
            self._last_print = now
            self._say(extra)

    def close(self, extra: str = "") -> None:
        self._say(extra)

    def _say(self, extra: str) -> None:
        if not self.quiet:
            log.info(self.line(extra))
