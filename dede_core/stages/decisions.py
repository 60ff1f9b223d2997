"""A reviewer's decisions (`dede review`, RUN/review/decisions.parquet) applied on top of the selection rule.

`keep` takes a sample out of the dropped table (unless the source no longer holds it: a retired sample cannot
come back); `drop` adds it with the reason `reviewer: <note>`. The latest decision per key wins. The file's
content hash joins the clean folder's identity, so another decisions file is refused like another rule, and the
selection's `how` says how many decisions changed the verdict (summary.json, report.html and sanitize.json show
it from there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dede_core.io import storage
from dede_core.io.source_index import CHANGED, REMOVED
from dede_core.sql import connect
from dede_core.stages.select import Counts, Selection
from schemas.tables import DECISION_DROP, DECISION_KEEP, DECISIONS, REJECTED, STATUS_SKIPPED, conform

log = logging.getLogger("dede")
REVIEWER = "reviewer"  # the reasons of the samples a reviewer dropped start with it


def read_decisions(path: str | os.PathLike) -> pa.Table:
    """A decisions file as the DECISIONS schema, one row per key (the latest decided_at wins), sorted by key;
    ValueError with what is wrong for any other file."""
    path = os.fspath(path)
    if not storage.isfile(path):
        raise ValueError(f"no decisions file at {path}; `dede review RUN` writes RUN/review/decisions.parquet")
    try:
        with storage.open_read(path) as f:
            table = pq.read_table(f)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path} is not a Parquet decisions file: {e}") from None
    missing = {"key", "decision", "decided_at"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(sorted(missing))} of a decisions file "
                         f"(key, decision, note, decided_at, group)")
    try:
        table = conform(table, DECISIONS)
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"{path} does not match the decisions schema: {e}") from None
    bad = set(table.column("decision").to_pylist()) - {DECISION_KEEP, DECISION_DROP}
    if bad:
        raise ValueError(f"{path}: decision must be {DECISION_KEEP!r} or {DECISION_DROP!r}, got {sorted(bad)}")
    table = table.sort_by([("key", "ascending"), ("decided_at", "ascending")])
    keys = table.column("key").to_pylist()
    last = [i for i in range(len(keys)) if i + 1 == len(keys) or keys[i + 1] != keys[i]]
    return table.take(pa.array(last, pa.int64()))


def file_sha256(path: str | os.PathLike) -> str:
    with storage.open_read(os.fspath(path)) as f:
        return hashlib.sha256(f.read()).hexdigest()


def _scored_rows(scores_dir: str, keys: list[str]) -> list[dict[str, Any]]:
    """key, shard, source, score of the scores rows of `keys` (every shard's row of a repeated key)."""
    conn = connect(scores_dir)
    try:
        conn.register("drop_keys", pa.table({"key": pa.array(keys, pa.string())}))
        return conn.sql(f"SELECT key, shard, source, score FROM scores WHERE status <> '{STATUS_SKIPPED}' AND key IN "
                        f"(SELECT key FROM drop_keys) ORDER BY shard, position, key").to_arrow_table().to_pylist()
    finally:
        conn.close()


def apply_decisions(selection: Selection, path: str | os.PathLike) -> Selection:
    """The selection with the decisions of `path` applied: keep -> out of the dropped table, drop -> in it with
    reason 'reviewer: <note>'; counts, per-shard counts and `how` follow."""
    decisions = read_decisions(path).to_pylist()
    keep = {d["key"] for d in decisions if d["decision"] == DECISION_KEEP}
    drop = {d["key"]: d["note"] for d in decisions if d["decision"] == DECISION_DROP}
    rows = selection.dropped.to_pylist()
    retired = {REMOVED, CHANGED}
    kept = [r for r in rows if r["key"] in keep and r["reason"] not in retired]
    rows = [r for r in rows if not (r["key"] in keep and r["reason"] not in retired)]
    already = {(r["shard"], r["key"]) for r in rows}
    found = _scored_rows(selection.scores_dir, sorted(keep | set(drop))) if decisions else []
    added = [{**r, "reason": f"{REVIEWER}: {drop[r['key']] or 'no note'}"} for r in found
             if r["key"] in drop and (r["shard"], r["key"]) not in already]
    rows += added
    unknown = (keep | set(drop)) - {r["key"] for r in found}
    if unknown:
        log.warning("%d decision(s) in %s name keys this run has not scored (e.g. %s); they change nothing",
                    len(unknown), os.fspath(path), sorted(unknown)[0])
    order = {name: i for i, name in enumerate(sorted(selection.by_shard))}
    rows.sort(key=lambda r: order.get(r["shard"], len(order)))  # stable: rule order inside a shard
    by_shard = dict(selection.by_shard)
    for r, sign in [(r, -1) for r in kept] + [(r, 1) for r in added]:
        c = by_shard.get(r["shard"], Counts())
        by_shard[r["shard"]] = dataclasses.replace(c, kept=c.kept - sign, dropped=c.dropped + sign)
    n_keep, n_drop = len({r["key"] for r in kept}), len({r["key"] for r in added})
    how = (f"{selection.how}; then {n_keep + n_drop} reviewer decision(s) changed the verdict ({n_keep} kept, "
           f"{n_drop} dropped) of the {len(decisions)} in {storage.basename(os.fspath(path))}")
    dropped = pa.Table.from_pylist(rows, schema=REJECTED) if rows else selection.dropped.slice(0, 0)
    return dataclasses.replace(selection, dropped=dropped, by_shard=by_shard, how=how,
                               counts=sum(by_shard.values(), Counts()))


def decided(selection: Selection, path: str | os.PathLike | None) -> tuple[Selection, dict[str, Any]]:
    """(the selection with the decisions applied, {"decisions": what joins the clean identity}); the selection
    as it is and {} without a decisions file. The identity holds the file's hash and what it changed, not its
    path, so a moved file still resumes."""
    if path is None:
        return selection, {}
    after = apply_decisions(selection, path)
    before = set(pc.unique(selection.dropped.column("key")).to_pylist())
    now = set(pc.unique(after.dropped.column("key")).to_pylist())
    return after, {"decisions": {"sha256": file_sha256(path), "kept": len(before - now),
                                 "dropped": len(now - before), "changed": len(before ^ now)}}
