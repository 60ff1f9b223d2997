"""Which samples to drop: one rule (dede_core.stages.rules), evaluated as one DuckDB query over the scores folder.

The default rule needs no labels: every signal becomes a p-value under a null fitted to the corpus' bulk, the
p-values combine into one per sample, and Benjamini-Hochberg at --fdr 0.05 flags what to drop
(dede_core.signals.verdict), so about 5% of what is dropped is clean whatever the poison rate, and a clean
corpus loses almost nothing. --fpr F instead drops above the (1 - F) quantile of held-out auxiliary scores.
A sample that could not be scored is dropped with its status and error, unless asked to keep it. The rule only
judges scored samples; keep_unscored decides the rest.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from dede_core.io import storage
from dede_core.detector.health import describe_health, health_passed
from dede_core.sql import connect, has_view
from schemas.sql import literal
from schemas.tables import REJECTED, STATUS_OK, STATUS_SKIPPED
from dede_core.signals.gather import default_neighbours, neighbours_files, signal_frame
from dede_core.signals.verdict import Verdict, VerdictConfig, decide, describe
from schemas.names import SCORE_RUN
from dede_core.stages.rules import (COLUMNS, DEFAULT_RULE, KINDS, Rule, _fpr_quantile, _quantile,  # noqa: F401
                                    format_number, fpr_threshold, percentile_name)


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
    verdict: Verdict | None = None  # an fdr rule's per-sample p-values and what each signal found

    def to_dict(self) -> dict[str, Any]:
        """Everything but the dropped rows, as plain JSON values."""
        return {"rule": self.rule.to_dict(), "rule_text": self.rule.label, "keep_unscored": self.keep_unscored,
                "threshold": self.threshold, "how": self.how, "counts": self.counts.to_dict(),
                "scores_dir": self.scores_dir, "detector_hash": self.detector_hash, "encoder_id": self.encoder_id,
                "detector_health": self.detector_health,
                "verdict": None if self.verdict is None else self.verdict.summary}


def valid_sql(column: str) -> str:
    """SQL: the row has a usable value in column (status ok, not null, not NaN)."""
    return f"(status = '{STATUS_OK}' AND {column} IS NOT NULL AND NOT isnan({column}))"


def hit_sql(rule: Rule, threshold: float | None) -> str:
    """SQL: the rule flags this scored row. Values are literals: a predicate could clash with parameters."""
    if rule.kind == "fdr":  # over a relation that carries the verdict's q_value (VERDICT_ROWS)
        return f"coalesce(q_value <= CAST({literal(repr(rule.value))} AS DOUBLE), false)"
    if rule.kind == "where":
        # Newlines keep a trailing -- comment in the predicate from swallowing the closing parenthesis.
        return f"coalesce((\n{rule.value}\n), false)"
    return f"({rule.column} > CAST({literal(repr(threshold))} AS DOUBLE))"


def scored_sql(rule: Rule) -> str:
    """SQL: the rule can judge this row (otherwise it is unscored)."""
    if rule.kind == "fdr":
        return f"({valid_sql('score')} AND q_value IS NOT NULL)"
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


def _threshold(conn: duckdb.DuckDBPyConnection, rule: Rule, scores_dir: str,
               verdict: Verdict | None = None) -> tuple[float | None, str]:
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
    if rule.kind == "fdr":
        return None, "; ".join(describe(verdict.summary))
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
    elif rule.kind == "fdr":
        reason = f"'combined q ' || printf('%.3g', q_value) || {literal(f' <= fdr {rule.value:g}')}"
    else:
        why = "threshold" if rule.kind == "threshold" else f"{rule.kind} {rule.value:g}"
        reason = literal(f"{rule.column} > {format_number(threshold)} ({why})")
    missing = "'not scored'" if rule.kind in ("where", "fdr") else literal(f"{STATUS_OK} but no {rule.column}")
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
# The judged rows with the verdict's q-value (registered as `verdict_rows`), for an fdr rule.
VERDICT_ROWS = f"(SELECT j.*, v.q_value FROM {JUDGED} j LEFT JOIN verdict_rows v USING (shard, key))"


def _verdict(conn: duckdb.DuckDBPyConnection, rule: Rule, neighbours: str | None) -> Verdict:
    """Every live scored sample's p-values and the Benjamini-Hochberg cut at the rule's rate."""
    frame = signal_frame(conn, LIVE, valid_sql("score"), neighbours)
    verdict = decide(frame, VerdictConfig(fdr=rule.value))
    verdict.summary["neighbours"] = neighbours if neighbours_files(neighbours) else None
    conn.register("verdict_rows", verdict.table.select(["key", "shard", "q_value"]))
    return verdict


def select(scores_dir: str | os.PathLike, rule: Rule = DEFAULT_RULE, *, keep_unscored: bool = False,
           retired: list[dict[str, str]] | None = None, neighbours: str | os.PathLike | None = None) -> Selection:
    """Apply one rule to every row of SCORES/*.parquet; the dropped rows come back with their reasons.
    retired: {key, shard, reason} of samples the source no longer holds (the shards manifest's `retired`):
    dropped with that reason, and left out of a quantile rule's threshold (and of the verdict's nulls).
    neighbours: the neighbours stage's folder, whose signals join the verdict of an fdr rule (default: the
    `neighbours` folder beside SCORES, when it is finished; without it the verdict has the scores' signals)."""
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
        verdict = None
        if rule.kind == "where":
            _check_predicate(conn, rule)
        elif rule.kind == "fdr":
            neighbours = default_neighbours(scores_dir) if neighbours is None else storage.absolute(neighbours)
            verdict = _verdict(conn, rule, neighbours)
        else:
            _check_column(conn, rule, scores_dir)
        threshold, how = _threshold(conn, rule, scores_dir, verdict)
        judged = judged_sql(rule, threshold, keep_unscored, VERDICT_ROWS if verdict else JUDGED)
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
                     scores_dir=scores_dir, detector_hash=detector, encoder_id=encoder, detector_health=health,
                     verdict=verdict)
