"""The detection signals: each is one module that registers one Signal; everything else reads the registry.

A signal names a column of the scores table or of the neighbours table, which tail of it is evidence of a
backdoor, and the scale its null is fitted on. The verdict (dede_core.signals.verdict) turns every available
signal into a p-value and combines those marked `in_verdict`; the selection, the report, the SQL views and the
review app list signals from here, never by name.
"""

from __future__ import annotations

from dataclasses import dataclass

TABLES = ("scores", "neighbours")
TAILS = ("upper", "lower")
SCALES = ("log", "linear")


@dataclass(frozen=True)
class Signal:
    """One detection signal."""

    name: str  # short id; its p-value column is p_<name>
    table: str  # where its column lives: scores | neighbours
    column: str  # the column it reads
    tail: str  # upper: large values are evidence of a backdoor; lower: small values are
    scale: str  # log | linear: the scale on which the null is a normal fitted to the corpus' bulk
    in_verdict: bool  # part of the combined p-value
    about: str  # one sentence for reports: what a small p-value means
    weight: float = 1.0  # its weight in the Cauchy combination (normalised over the signals combined)

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"signal {self.name!r}: weight must be > 0, got {self.weight!r}")
        for field, value, allowed in (("table", self.table, TABLES), ("tail", self.tail, TAILS),
                                      ("scale", self.scale, SCALES)):
            if value not in allowed:
                raise ValueError(f"signal {self.name!r}: {field} must be one of {', '.join(allowed)}, got {value!r}")

    @property
    def p_column(self) -> str:
        return f"p_{self.name}"


SIGNALS: dict[str, Signal] = {}


def register(signal: Signal) -> Signal:
    """Add a signal (a module does this once, at import)."""
    if signal.name in SIGNALS and SIGNALS[signal.name] != signal:
        raise ValueError(f"a different signal named {signal.name!r} is registered already")
    SIGNALS[signal.name] = signal
    return signal


def signals(table: str | None = None) -> list[Signal]:
    """The registered signals (of one table), in registration order."""
    return [s for s in SIGNALS.values() if table is None or s.table == table]
