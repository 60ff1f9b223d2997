"""Which samples to drop: one rule, evaluated as one DuckDB query over the scores folder.

The default rule needs no labels: the threshold is the (1 - F) quantile of the scores of held-out auxiliary
images the detector never trained on, so about a fraction F of clean images land above it, whatever the
(unknown) poison rate. A sample that could not be scored is dropped with its status and error, unless asked
to keep it. The rule only judges scored samples; keep_unscored decides the rest.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from numpy.typing import ArrayLike

from dede_core.io import storage
from dede_core.detector.health import describe_health, health_passed
from dede_core.sql import connect, has_view
from schemas.sql import literal
from schemas.tables import REJECTED, STATUS_OK, STATUS_SKIPPED
from schemas.names import SCORE_RUN


KINDS = ("fpr", "quantile", "threshold", "where")
COLUMNS = ("score", "knn_score", "density_score", "recon_error")


def _fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number strictly between 0 and 1 (e.g. 0.05), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Rule:
    """One selection rule; build it with Rule.fpr / .quantile / .threshold / .where."""

    kind: str  # fpr | quantile | threshold | where
    value: float | str  # F, Q, T, or the SQL predicate
    column: str | None = "score"  # compared with the threshold: score | knn_score (None for where)
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
        if self.column not in COLUMNS:
            raise ValueError(f"column must be one of {', '.join(COLUMNS)}, got {self.column!r}")
        if self.kind in ("fpr", "quantile"):
            object.__setattr__(self, "value", _fraction(self.kind, self.value))
        elif isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"threshold must be a finite number (e.g. 812.4), got {self.value!r}")
        else:
            object.__setattr__(self, "value", float(self.value))

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
        on = "" if self.column == "score" else f" on {self.column}"
        return f"{self.kind} {self.value:g}{on}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rule:
        return cls(data["kind"], data["value"], data.get("column"), bool(data.get("allow_weak_detector", False)))


DEFAULT_RULE = Rule.fpr(0.05)


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


@dataclass(frozen=True)
class Counts:
    """Samples judged; total = kept + dropped; unscored is how many had no usable score (kept or not)."""

    total: int = 0
    kept: int = 0
    dropped: int = 0
    unscored: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Selection:
    """What a rule drops from a scores folder, and why."""

    rule: Rule
    keep_unscored: bool
    threshold: float | None  # None for a where rule
    how: str  # one sentence: how the threshold was chosen
    counts: Counts  # over the rows of the scores table
    by_shard: dict[str, Counts]  # the same, per shard file name
    dropped: pa.Table  # REJECTED schema, one row per dropped key, in shard and position order
    scores_dir: str
    detector_hash: str | None  # None only when the scores folder has no rows
    encoder_id: str | None
    detector_health: dict[str, Any] | None = None  # the detector's label-free health check (dede_core.detector.health)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the dropped rows, as plain JSON values."""
        return {"rule": self.rule.to_dict(), "rule_text": self.rule.label, "keep_unscored": self.keep_unscored,
                "threshold": self.threshold, "how": self.how, "counts": self.counts.to_dict(),
                "scores_dir": self.scores_dir, "detector_hash": self.detector_hash, "encoder_id": self.encoder_id,
                "detector_health": self.detector_health}


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


def valid_sql(column: str) -> str:
    """SQL: the row has a usable value in column (status ok, not null, not NaN)."""
    return f"(status = '{STATUS_OK}' AND {column} IS NOT NULL AND NOT isnan({column}))"


def hit_sql(rule: Rule, threshold: float | None) -> str:
    """SQL: the rule flags this scored row. Values are literals: a predicate could clash with parameters."""
    if rule.kind == "where":
        # Newlines keep a trailing -- comment in the predicate from swallowing the closing parenthesis.
        return f"coalesce((\n{rule.value}\n), false)"
    return f"({rule.column} > CAST({literal(repr(threshold))} AS DOUBLE))"


def scored_sql(rule: Rule) -> str:
    """SQL: the rule can judge this row (otherwise it is unscored)."""
    return f"(status = '{STATUS_OK}')" if rule.kind == "where" else valid_sql(rule.column)


def _check_one_detector(conn: duckdb.DuckDBPyConnection, scores_dir: str) -> tuple[str | None, str | None]:
    rows = conn.execute(
        "SELECT detector_hash, encoder_id, count(DISTINCT shard), min(shard) FROM scores "
        "GROUP BY ALL ORDER BY 4"
    ).fetchall()
    if len(rows) > 1:
        shown = "; ".join(f"detector {d} with encoder {e}: {n} shard(s) from {s}" for d, e, n, s in rows[:5])
        raise ValueError(f"{scores_dir} mixes scores of {len(rows)} detectors/encoders ({shown}); scores are "
                         f"comparable only from one detector: rescore every shard into an empty folder")
    return (rows[0][0], rows[0][1]) if rows else (None, None)


def _check_unique_keys(conn: duckdb.DuckDBPyConnection, scores_dir: str) -> None:
    """A key may repeat only in rows retired from the source (a changed sample's old version)."""
    dups = conn.execute(
        f"SELECT key, count(*), string_agg(shard, ', ') FROM {LIVE} GROUP BY key HAVING count(*) > 1 LIMIT 5"
    ).fetchall()
    if dups:
        shown = "; ".join(f"{k!r} x{n} ({s})" for k, n, s in dups)
        raise ValueError(f"{scores_dir} holds duplicate keys ({shown}); each sample must be scored once: "
                         f"remove stray scores files or rescore into an empty folder")


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


def _threshold(conn: duckdb.DuckDBPyConnection, rule: Rule, scores_dir: str) -> tuple[float | None, str]:
    """(threshold, how it was chosen) for the rule."""
    col = rule.column
    noun = "scores" if col == "score" else f"{col} values"
    if rule.kind == "fpr":
        if not has_view(conn, "calibration"):
            raise ValueError(f"no calibration.parquet in {scores_dir}, which --fpr needs; rescore with a detector "
                             f"that holds a calibration set, or use --quantile Q / --threshold T")
        t, n = _fpr_quantile(conn.sql(f"SELECT {col} FROM calibration").to_arrow_table().column(0), rule.value)
        if n == 0:
            raise ValueError(f"calibration.parquet in {scores_dir} holds no finite {col}; "
                             f"use --quantile or --threshold")
        return t, (f"{col} > {format_number(t)}, the {percentile_name(1 - rule.value)} percentile of {n} held-out "
                   f"calibration {noun} (fpr target {rule.value:g}, chosen without labels)")
    if rule.kind == "quantile":
        t, n = _quantile(conn, LIVE, col, rule.value, valid_sql(col))
        if n == 0:
            raise ValueError(f"no scored sample with a finite {col} in {scores_dir}; nothing to take a quantile of")
        return t, (f"{col} > {format_number(t)}, the {percentile_name(rule.value)} percentile of this corpus' own "
                   f"{n} {noun} (quantile {rule.value:g}: drops about {100 * (1 - rule.value):g}% of the scored "
                   f"samples whatever the poison rate)")
    if rule.kind == "threshold":
        return rule.value, f"{col} > {format_number(rule.value)}, a fixed threshold given by the user"
    return None, f"rows matching the SQL predicate: {rule.value}"


def _check_predicate(conn: duckdb.DuckDBPyConnection, rule: Rule) -> None:
    """Bind the predicate against the scores columns once, so a typo fails with DuckDB's message."""
    try:
        kind = conn.execute(f"DESCRIBE SELECT (\n{rule.value}\n) AS hit FROM scores").fetchall()[0][1]
    except duckdb.Error as e:
        columns = [r[0] for r in conn.execute("DESCRIBE scores").fetchall()]
        raise ValueError(f"the where predicate {rule.value!r} does not run on the scores table "
                         f"(columns: {', '.join(columns)}): {e}") from None
    if kind != "BOOLEAN":
        raise ValueError(f"the where predicate {rule.value!r} gives {kind}, not true/false; compare it, "
                         f"e.g. 'score > 900'")


def _check_column(conn: duckdb.DuckDBPyConnection, rule: Rule, scores_dir: str) -> None:
    ok, valued = conn.execute(
        f"SELECT count(*) FILTER (WHERE status = '{STATUS_OK}'), count(*) FILTER (WHERE {valid_sql(rule.column)}) "
        f"FROM scores").fetchall()[0]
    if ok and not valued:
        raise ValueError(f"no sample in {scores_dir} has a {rule.column} (the detector may have no k-NN bank); "
                         f"select on score instead")


def judged_sql(rule: Rule, threshold: float | None, keep_unscored: bool, rows: str = "scores") -> str:
    """SQL over the scores view: key, shard, position, source, score, unscored, reason (NULL when kept). rows: the
    relation judged, `scores` or LIVE (retired rows carry their reason in `retired_reason`)."""
    if rule.kind == "where":
        reason = literal(f"where: {rule.value}")
    else:
        why = "threshold" if rule.kind == "threshold" else f"{rule.kind} {rule.value:g}"
        reason = literal(f"{rule.column} > {format_number(threshold)} ({why})")
    missing = "'not scored'" if rule.kind == "where" else literal(f"{STATUS_OK} but no {rule.column}")
    unscored_reason = (f"CASE WHEN status <> '{STATUS_OK}' THEN status || coalesce(': ' || error, '') "
                       f"ELSE {missing} END")
    retired = rows != "scores"
    return (
        f"SELECT key, shard, position, source, score, "
        f"{'retired_reason IS NULL AND ' if retired else ''}NOT {scored_sql(rule)} AS unscored, CASE "
        + ("WHEN retired_reason IS NOT NULL THEN retired_reason " if retired else "")
        + f"WHEN NOT {scored_sql(rule)} THEN {'NULL' if keep_unscored else unscored_reason} "
        f"WHEN {hit_sql(rule, threshold)} THEN {reason} END AS reason FROM {rows}"
    )


def check_health(scores_dir: str, rule: Rule) -> dict[str, Any] | None:
    """The scoring detector's health check, from SCORES/run.json; ValueError when it failed and the rule does not
    allow a weak detector. None for a folder scored by a detector that predates the check."""
    path = storage.join(scores_dir, SCORE_RUN)
    if not storage.isfile(path):
        return None
    health = storage.read_json(path).get("detector_health")
    if health_passed(health) is False and not rule.allow_weak_detector:
        raise ValueError(f"refusing to clean with the detector behind {scores_dir}: {describe_health(health)}")
    return health


# Rows of samples the source no longer holds (the shards manifest's `retired`), registered as `retired_rows`.
RETIRED = pa.schema([("shard", pa.string()), ("key", pa.string()), ("reason", pa.string())])
# Source entries `dede shard` left out (status skipped) are in no shard: there is nothing to clean of them.
JUDGED = ("(SELECT s.*, r.reason AS retired_reason FROM scores s LEFT JOIN retired_rows r USING (shard, key) "
          f"WHERE s.status <> '{STATUS_SKIPPED}')")
LIVE = (f"(SELECT * FROM scores ANTI JOIN retired_rows USING (shard, key) WHERE status <> '{STATUS_SKIPPED}')")


def select(scores_dir: str | os.PathLike, rule: Rule = DEFAULT_RULE, *, keep_unscored: bool = False,
           retired: list[dict[str, str]] | None = None) -> Selection:
    """Apply one rule to every row of SCORES/*.parquet; the dropped rows come back with their reasons.
    retired: {key, shard, reason} of samples the source no longer holds (the shards manifest's `retired`):
    dropped with that reason, and left out of a quantile rule's threshold."""
    if not isinstance(rule, Rule):
        raise ValueError(f"rule must be a Rule (Rule.fpr(0.05), ...), got {type(rule).__name__}")
    scores_dir = storage.absolute(scores_dir)  # a local path or a URL
    conn = connect(scores_dir)
    try:
        columns = [[r[c] for r in retired or []] for c in RETIRED.names]
        conn.register("retired_rows", pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns],
                                                           schema=RETIRED))
        detector, encoder = _check_one_detector(conn, scores_dir)
        health = check_health(scores_dir, rule)
        _check_unique_keys(conn, scores_dir)
        if rule.kind == "where":
            _check_predicate(conn, rule)
        else:
            _check_column(conn, rule, scores_dir)
        threshold, how = _threshold(conn, rule, scores_dir)
        judged = judged_sql(rule, threshold, keep_unscored, JUDGED)
        try:
            per_shard = conn.execute(
                f"SELECT shard, count(*), count(reason), count(*) FILTER (WHERE unscored) FROM ({judged}) "
                f"GROUP BY shard ORDER BY shard").fetchall()
            dropped = conn.sql(f"SELECT key, shard, source, score, reason FROM ({judged}) WHERE reason IS NOT NULL "
                               f"ORDER BY shard, position, key").to_arrow_table()
        except duckdb.Error as e:
            raise ValueError(f"selecting with {rule.label!r} failed: {e}") from None
    finally:
        conn.close()
    by_shard = {s: Counts(total=n, kept=n - d, dropped=d, unscored=u) for s, n, d, u in per_shard}
    return Selection(rule=rule, keep_unscored=keep_unscored, threshold=threshold, how=how,
                     counts=sum(by_shard.values(), Counts()), by_shard=by_shard, dropped=dropped.cast(REJECTED),
                     scores_dir=scores_dir, detector_hash=detector, encoder_id=encoder, detector_health=health)
