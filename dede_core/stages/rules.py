"""The selection rules: which samples to drop, as one value object (the default: the combined verdict at
--fdr 0.05), the quantile thresholds --fpr and --quantile take (DuckDB's quantile_cont) and their wording."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from numpy.typing import ArrayLike

KINDS = ("fdr", "fpr", "quantile", "threshold", "where")
COLUMNS = ("score", "knn_score", "density_score", "recon_error")


def _fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number strictly between 0 and 1 (e.g. 0.05), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Rule:
    """One selection rule; build it with Rule.fpr / .quantile / .threshold / .where."""

    kind: str  # fdr | fpr | quantile | threshold | where
    value: float | str  # the false discovery rate, F, Q, T, or the SQL predicate
    column: str | None = "score"  # compared with the threshold: score | knn_score | ... (None for fdr and where)
    # Select even when the detector failed its health check (dede_core.detector.health): it cannot find backdoors, so
    # cleaning with it would drop clean samples at random and keep the triggered ones.
    allow_weak_detector: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rule kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "where":
            if self.column is not None:
                raise ValueError("a where rule names its columns in the predicate; leave column unset")
            object.__setattr__(self, "value", _predicate(self.value))
            return
        if self.kind == "fdr":
            if self.column is not None:
                raise ValueError("an fdr rule judges the combined p-value of every signal; leave column unset")
            object.__setattr__(self, "value", _fraction("fdr", self.value))
            return
        if self.column not in COLUMNS:
            raise ValueError(f"column must be one of {', '.join(COLUMNS)}, got {self.column!r}")
        if self.kind in ("fpr", "quantile"):
            object.__setattr__(self, "value", _fraction(self.kind, self.value))
        elif isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"threshold must be a finite number (e.g. 812.4), got {self.value!r}")
        else:
            object.__setattr__(self, "value", float(self.value))

    @classmethod
    def fdr(cls, rate: float = 0.05) -> Rule:
        """Drop the samples Benjamini-Hochberg flags at `rate` over the combined p-values of every signal
        (dede_core.signals.verdict): about `rate` of what it drops is clean, whatever the poison rate, and a corpus
        with no poison loses almost nothing."""
        return cls("fdr", rate, None)

    @classmethod
    def fpr(cls, target: float = 0.05, *, column: str = "score") -> Rule:
        """Drop above the (1 - target) quantile of the held-out calibration scores (chosen without labels)."""
        return cls("fpr", target, column)

    @classmethod
    def quantile(cls, q: float, *, column: str = "score") -> Rule:
        """Drop above the q quantile of the corpus' own scores (always drops about 1 - q of it)."""
        return cls("quantile", q, column)

    @classmethod
    def threshold(cls, t: float, *, column: str = "score") -> Rule:
        """Drop samples whose column is above t."""
        return cls("threshold", t, column)

    @classmethod
    def where(cls, predicate: str) -> Rule:
        """Drop the rows matching a SQL predicate over the scores columns, e.g. 'score > 900 OR knn_score > 3.1'."""
        return cls("where", predicate, None)

    @property
    def label(self) -> str:
        """Short text for reasons and logs: 'fpr 0.05', 'quantile 0.95', 'threshold 700', 'where: ...'."""
        if self.kind == "where":
            return f"where: {self.value}"
        if self.kind == "fdr":
            return f"fdr {self.value:g}"
        on = "" if self.column == "score" else f" on {self.column}"
        return f"{self.kind} {self.value:g}{on}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        column = data.get("column", None if data["kind"] in ("fdr", "where") else "score")
        return cls(data["kind"], data["value"], column, bool(data.get("allow_weak_detector", False)))


DEFAULT_RULE = Rule.fdr(0.05)


def _predicate(text: object) -> str:
    """A user predicate, checked to be exactly one SQL expression (so it cannot end or add a statement)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the where predicate must be a non-empty SQL expression, e.g. 'score > 900'")
    if ";" in text:
        raise ValueError(f"the where predicate must be one expression, not statements (no ';'): {text!r}")
    try:
        duckdb.SQLExpression(text)
    except duckdb.Error as e:
        raise ValueError(f"the where predicate {text!r} is not a SQL expression: {e}") from None
    return text.strip()


def format_number(x: float) -> str:
    """812.4012 -> '812.40', 0.012345 -> '0.01235': enough digits to read, the exact value is stored apart."""
    return f"{x:.2f}" if math.isfinite(x) and abs(x) >= 1 else f"{x:.4g}"


def percentile_name(q: float) -> str:
    """0.95 -> '95th', 0.99 -> '99th', 0.975 -> '97.5th', 0.01 -> '1st'."""
    p = round(q * 100, 6)
    if p != int(p):
        return f"{p:g}th"
    p = int(p)
    suffix = "th" if 10 <= p % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(p % 10, "th")
    return f"{p}{suffix}"


def _quantile(conn: duckdb.DuckDBPyConnection, view: str, column: str, q: float, where: str) -> tuple[float, int]:
    value, n = conn.execute(
        f"SELECT quantile_cont({column}, ?), count({column}) FROM {view} WHERE {where} AND isfinite({column})", [q]
    ).fetchall()[0]
    return value, n


def _fpr_quantile(values: ArrayLike, fpr: float) -> tuple[float | None, int]:
    """(the --fpr threshold of `values`, how many finite values it was taken over); (None, 0) when none is."""
    column = pa.array(np.asarray(values, dtype=np.float64).reshape(-1))  # NaN stays NaN: isfinite drops it
    conn = duckdb.connect()
    try:
        conn.register("heldout", pa.table({"value": column}))
        return _quantile(conn, "heldout", "value", 1 - fpr, "true")
    finally:
        conn.close()


def fpr_threshold(values: ArrayLike, fpr: float) -> float:
    """The --fpr rule's threshold: the (1 - fpr) quantile of held-out calibration values, linear between order
    statistics (DuckDB quantile_cont) over the finite ones. About `fpr` of clean-like samples score above it,
    whatever the poison rate. The selection computes its threshold with this function, bit for bit."""
    fpr = _fraction("fpr", fpr)
    threshold, n = _fpr_quantile(values, fpr)
    if n == 0:
        raise ValueError("no finite held-out value to take the --fpr threshold of; score held-out images first")
    return threshold
