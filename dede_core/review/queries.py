"""What the review page shows of a finished run: its summary, the flagged samples, their groups, query results.

Every table is read through the locked-down connection of `dede sql` (dede_core.sql.connect): the app's own
queries and the user's see the same views. Flagged = RUN/clean/rejected.parquet (or, before any clean, what the
default rule would drop) plus the samples RUN/clean/verdict.parquet marks. Groups = the corpus-level
neighbourhoods of RUN/neighbours/*.parquet with at least two members and one flagged, else the flagged samples
by label. Nothing here writes.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dede_core.io import storage
from dede_core.sql import connect, run_query
from dede_core.signals.gather import neighbours_files
from dede_core.sql_page import result_samples
from dede_core.stages.select import DEFAULT_RULE, select
from schemas import names
from schemas.manifest import manifest_path, read_manifest
from schemas.tables import STATUS_SKIPPED

THUMB_SIDE = 128
WEB_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}
SHOWN_COLUMNS = ("key", "shard", "label", "source", "score", "knn_score", "density_score", "status", "reason",
                 "q_value")
MAX_ROWS = 2000  # rows of a table or query result sent to the page


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    text = str(value)
    return text if len(text) <= 200 else text[:197] + "..."


def rows_json(table: pa.Table, limit: int = MAX_ROWS) -> list[dict[str, Any]]:
    """The first `limit` rows as plain JSON values (NaN and infinities as text, other types as short text)."""
    return [{k: _json_value(v) for k, v in r.items()} for r in table.slice(0, limit).to_pylist()]


def thumbnail(data: bytes | None) -> tuple[bytes, str] | None:
    """(bytes, MIME type) of an image at most THUMB_SIDE on a side: a small PNG/JPEG/GIF/WebP as it is (the page
    enlarges it without blur), anything else as a downscaled PNG; None when it does not decode."""
    if data is None:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        if max(image.size) <= THUMB_SIDE and image.format in WEB_TYPES:
            return data, WEB_TYPES[image.format]
        image = image.convert("RGB")
    except Exception:  # noqa: BLE001 - the corpus may hold anything; the page shows a placeholder
        return None
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), "image/png"


@dataclasses.dataclass
class RunFolders:
    """The folders of a sanitize RUN the app reads."""

    run: str
    scores: str
    shards: str
    clean: str | None  # None before any clean

    @classmethod
    def of(cls, run: str | os.PathLike) -> RunFolders:
        run = os.path.abspath(os.fspath(run))
        scores, shards = os.path.join(run, names.SCORES_DIR), os.path.join(run, names.SHARDS_DIR)
        if not os.path.isdir(scores):
            raise ValueError(f"{run} has no scores folder ({names.SCORES_DIR}/): give the RUN folder of a finished "
                             f"`dede sanitize` (or score it first)")
        if not os.path.isfile(manifest_path(shards)):
            raise ValueError(f"{run} has no shards folder with a manifest.json: the images are read from it")
        clean = os.path.join(run, names.CLEAN_DIR)
        return cls(run, scores, shards, clean if os.path.isfile(os.path.join(clean, names.REJECTED)) else None)


class RunData:
    """The run's tables, read once when the app starts (the run is finished: they do not change)."""

    def __init__(self, folders: RunFolders, *, thumb_cache: int = 20_000) -> None:
        self.f = folders
        self.classes = read_manifest(folders.shards).classes
        self._thumbs: dict[str, tuple[bytes, str] | None] = {}
        self._thumb_cache = thumb_cache
        self.flagged_by, dropped = self._dropped()
        self.flagged = self._flagged(dropped)
        self.groups, self.members = self._groups()

    def connect(self) -> duckdb.DuckDBPyConnection:
        """The `dede sql` connection over this run: scores, calibration, rejected (after a clean), manifest."""
        return connect(self.f.scores, rejected=self.f.clean, manifest=self.f.shards)

    def _dropped(self) -> tuple[str, pa.Table]:
        if self.f.clean is not None:
            return f"{names.CLEAN_DIR}/{names.REJECTED}", pq.read_table(os.path.join(self.f.clean, names.REJECTED))
        rule = dataclasses.replace(DEFAULT_RULE, allow_weak_detector=True)
        try:
            sel = select(self.f.scores, rule, retired=read_manifest(self.f.shards).retired)
        except ValueError as e:
            return f"nothing: the run is not cleaned and the default rule cannot run ({e})", pa.table(
                {"key": pa.array([], pa.string()), "shard": pa.array([], pa.string()),
                 "reason": pa.array([], pa.string())})
        return f"the default rule ({rule.label}; the run is not cleaned yet)", sel.dropped

    def _verdict(self) -> pa.Table | None:
        path = os.path.join(self.f.clean or os.path.join(self.f.run, names.CLEAN_DIR), names.VERDICT)
        return pq.read_table(path) if os.path.isfile(path) else None

    def _flagged(self, dropped: pa.Table) -> pa.Table:
        """One row per flagged sample: the scores' columns, the reason it was dropped, the verdict's q_value."""
        conn = self.connect()
        try:
            columns = {r[0] for r in conn.execute("DESCRIBE scores").fetchall()}
            conn.register("dropped_rows", dropped.select(["key", "shard", "reason"]))
            verdict = self._verdict()
            if verdict is not None:
                keep = ["key", "verdict"] + (["q_value"] if "q_value" in verdict.column_names else [])
                conn.register("verdict_rows", verdict.select(keep))
                self.flagged_by += f" and {names.CLEAN_DIR}/{names.VERDICT}"
            wanted = [c for c in SHOWN_COLUMNS if c in columns]
            q = "v.q_value" if verdict is not None and "q_value" in verdict.column_names else "NULL::DOUBLE"
            join = "LEFT JOIN verdict_rows v USING (key)" if verdict is not None else ""
            hit = "d.key IS NOT NULL" + (" OR coalesce(v.verdict, false)" if verdict is not None else "")
            return conn.sql(
                f"SELECT {', '.join('s.' + c for c in wanted if c not in ('reason', 'q_value'))}, d.reason, "
                f"{q} AS q_value FROM scores s LEFT JOIN dropped_rows d USING (shard, key) {join} "
                f"WHERE s.status <> '{STATUS_SKIPPED}' AND ({hit}) "
                f"ORDER BY s.score DESC NULLS LAST, s.key").to_arrow_table()
        finally:
            conn.close()

    def _neighbours(self) -> pa.Table | None:
        files = neighbours_files(os.path.join(self.f.run, names.NEIGHBOURS_DIR))  # a finished folder only
        if not files:
            return None
        return pa.concat_tables(pq.read_table(f, columns=["key", "shard", "group_id", "group_size"])
                                for f in files)

    def _groups(self) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
        """(the groups, largest first, each with its evidence; group id -> member keys, highest score first)."""
        neighbours = self._neighbours()
        conn = self.connect()
        try:
            conn.register("flagged_rows", self.flagged.select(["key", "shard"]))
            if neighbours is not None:
                conn.register("nb", neighbours)
                members = (
                    "SELECT 'n' || nb.group_id AS gid, 'neighbourhood ' || nb.group_id AS title, s.key, s.score, "
                    "s.knn_score, f.key IS NOT NULL AS flagged FROM nb JOIN scores s USING (shard, key) "
                    "LEFT JOIN flagged_rows f USING (shard, key) WHERE nb.group_size >= 2 AND nb.group_id IN "
                    "(SELECT group_id FROM nb JOIN flagged_rows USING (shard, key))")
                self.grouped_by = f"{names.NEIGHBOURS_DIR}/: neighbourhoods of 2+ samples holding a flagged one"
            else:
                members = (
                    "SELECT 'label:' || coalesce(s.label::VARCHAR, 'none') AS gid, s.label, s.key, s.score, "
                    "s.knn_score, true AS flagged FROM scores s JOIN flagged_rows USING (shard, key)")
                self.grouped_by = "label (no neighbours/ folder in the run)"
            rows = conn.sql(f"SELECT * FROM ({members}) ORDER BY gid, score DESC NULLS LAST, key").to_arrow_table()
        finally:
            conn.close()
        by_group: dict[str, list[dict[str, Any]]] = {}
        for r in rows.to_pylist():
            by_group.setdefault(r["gid"], []).append(r)
        groups = []
        for gid, rs in by_group.items():
            scores = [r["score"] for r in rs if r["score"] is not None and math.isfinite(r["score"])]
            knn = [r["knn_score"] for r in rs if r["knn_score"] is not None and math.isfinite(r["knn_score"])]
            groups.append({"id": gid, "title": rs[0].get("title") or self._label_title(rs[0].get("label")),
                           "size": len(rs), "flagged": sum(r["flagged"] for r in rs),
                           "mean_score": sum(scores) / len(scores) if scores else None,
                           "max_score": max(scores) if scores else None,
                           "mean_knn_score": sum(knn) / len(knn) if knn else None})
        groups.sort(key=lambda g: (-g["size"], g["id"]))
        return groups, {gid: [r["key"] for r in rs] for gid, rs in by_group.items()}

    def _label_title(self, label: int | None) -> str:
        if label is None:
            return "label none"
        name = self.classes[label] if self.classes and 0 <= label < len(self.classes) else None
        return f"label {label}" + (f" ({name})" if name else "")

    def thumbnails(self, keys: list[str]) -> dict[str, tuple[bytes, str] | None]:
        """key -> (thumbnail, MIME type), None when not found or undecodable; read from the shards once, cached."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._thumbs]
        if missing:
            samples = result_samples(pa.table({"key": pa.array(missing, pa.string())}), self.f.scores, self.f.shards,
                                     len(missing))
            if len(self._thumbs) + len(samples) > self._thumb_cache:
                self._thumbs.clear()
            for s in samples:
                self._thumbs[str(s["key"])] = thumbnail(s["image"])
        return {k: self._thumbs.get(k) for k in keys}

    def thumbnail_uris(self, keys: list[str]) -> dict[str, str | None]:
        """key -> data: URI of its thumbnail (None when there is none)."""
        return {k: None if v is None else f"data:{v[1]};base64," + base64.b64encode(v[0]).decode("ascii")
                for k, v in self.thumbnails(keys).items()}

    def query(self, sql: str, thumbnails: int = 200) -> dict[str, Any]:
        """A user query through the `dede sql` guard: columns, the first MAX_ROWS rows, and thumbnails of the
        first `thumbnails` rows when the result has a `key` column."""
        conn = self.connect()
        try:
            table = run_query(conn, sql)
        finally:
            conn.close()
        rows = rows_json(table)
        thumbs: dict[str, str | None] = {}
        if "key" in table.column_names and thumbnails > 0:
            keys = [str(k) for k in table.column("key").slice(0, thumbnails).to_pylist() if k is not None]
            thumbs = self.thumbnail_uris(keys)
        return {"columns": table.column_names, "rows": rows, "total": table.num_rows, "thumbnails": thumbs}

    def summary(self) -> dict[str, Any]:
        """run.json's detector health, clean/summary.json's counts, rule and any verdict section, and where the
        flagged samples and the groups come from."""
        run = os.path.join(self.f.scores, names.SCORE_RUN)
        health = storage.read_json(run).get("detector_health") if os.path.isfile(run) else None
        out: dict[str, Any] = {"run": self.f.run, "detector_health": health, "flagged_by": self.flagged_by,
                               "grouped_by": self.grouped_by, "flagged": self.flagged.num_rows,
                               "groups": len(self.groups), "clean": None}
        path = os.path.join(self.f.run, names.CLEAN_DIR, names.SUMMARY)
        if os.path.isfile(path):
            s = storage.read_json(path)
            out["clean"] = {k: s.get(k) for k in ("counts", "rule_text", "threshold", "how", "decisions")}
            out["clean"].update({k: v for k, v in s.items() if k in ("verdict", "expected_precision", "signals")})
        return out
