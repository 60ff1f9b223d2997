"""The verdict's input: each scored sample's signal columns, from the scores table and, when the corpus-level
neighbours stage has run, its table joined by (shard, key)."""

from __future__ import annotations

import posixpath

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dede_core.io import storage
from dede_core.signals.registry import signals
from schemas.names import NEIGHBOURS_DIR


def default_neighbours(scores_dir: str) -> str:
    """Where a sanitize run keeps the neighbours stage's folder: beside the scores folder."""
    return storage.join(posixpath.dirname(storage.absolute(scores_dir).rstrip("/")), NEIGHBOURS_DIR)


def neighbours_files(neighbours_dir: str | None) -> list[str]:
    """The per-shard files of a finished neighbours folder (its summary.json is written last), else []."""
    if neighbours_dir is None or not storage.isfile(storage.join(neighbours_dir, "summary.json")):
        return []
    return sorted(storage.join(neighbours_dir, n) for n in storage.listdir(neighbours_dir)
                  if n.endswith(".parquet") and n[:1].isdigit())


def _neighbours_table(files: list[str]) -> pa.Table | None:
    wanted = ["key", "shard"] + [s.column for s in signals("neighbours")]
    parts = []
    for path in files:
        with storage.open_read(path) as f:
            table = pq.read_table(f)
        parts.append(table.select([c for c in wanted if c in table.column_names]))
    return pa.concat_tables(parts, promote_options="default") if parts else None


def signal_frame(conn: duckdb.DuckDBPyConnection, relation: str, where: str,
                 neighbours_dir: str | None) -> dict[str, np.ndarray]:
    """key, shard and every registered signal's column for the rows of `relation` matching `where`."""
    columns = [s.column for s in signals("scores")]
    table = conn.sql(f"SELECT key, shard, {', '.join(columns)} FROM {relation} WHERE {where} "
                     f"ORDER BY shard, position, key").to_arrow_table()
    found = _neighbours_table(neighbours_files(neighbours_dir))
    if found is not None:
        conn.register("neighbour_rows", found)
        extra = [c for c in found.column_names if c not in ("key", "shard")]
        picked = ", ".join(f"n.{c}" for c in extra)
        conn.register("signal_rows", table)
        table = conn.sql(f"SELECT s.*, {picked} FROM signal_rows s LEFT JOIN neighbour_rows n USING (shard, key) "
                         f"ORDER BY s.shard, s.key").to_arrow_table() if extra else table
        conn.unregister("signal_rows")
        conn.unregister("neighbour_rows")
    return {name: table.column(name).to_numpy(zero_copy_only=False) if name in ("key", "shard")
            else _floats(table.column(name)) for name in table.column_names}


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float64, null as NaN."""
    return column.cast(pa.float64()).fill_null(float("nan")).to_numpy()


def calibration_frame(conn: duckdb.DuckDBPyConnection) -> dict[str, np.ndarray]:
    """The held-out calibration images' scores-table columns (for a calibration null)."""
    names = {r[0] for r in conn.execute("DESCRIBE calibration").fetchall()}
    columns = [s.column for s in signals("scores") if s.column in names]
    table = conn.sql(f"SELECT {', '.join(columns)} FROM calibration").to_arrow_table()
    return {c: _floats(table.column(c)) for c in columns}
