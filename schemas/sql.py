"""The DuckDB views over a scores folder, defined once, and the settings that lock a connection down.

`dede sql`, the selection rules and the report all query these views, so a column means the same everywhere.
Paths are bound as SQL string literals (DuckDB does not take parameters in view definitions).
"""

from __future__ import annotations

from collections.abc import Sequence

# Every scores file of a folder (one per shard); union_by_name because the embedding column is optional.
SCORES_VIEW = "CREATE VIEW scores AS SELECT * FROM read_parquet({files}, union_by_name = true)"
# Files written before the `source` column (schemas/tables.py) get it as NULL, so every query may name it.
ADD_SOURCE = ("ALTER VIEW {view} RENAME TO {view}_without_source",
              "CREATE VIEW {view} AS SELECT *, CAST(NULL AS VARCHAR) AS source FROM {view}_without_source")
# Scores of held-out auxiliary images the detector never trained on: the label-free reference for --fpr.
CALIBRATION_VIEW = "CREATE VIEW calibration AS SELECT * FROM read_parquet({file})"
# What a clean run dropped, with the reason (REJECTED schema).
REJECTED_VIEW = "CREATE VIEW rejected AS SELECT * FROM read_parquet({file})"
# The corpus-level neighbourhoods (dede neighbours), one row per sample, joined to scores by (shard, key).
NEIGHBOURS_VIEW = "CREATE VIEW neighbours AS SELECT * FROM read_parquet({files}, union_by_name = true)"
# The combined verdict of a clean run under --fdr: each signal's p-value, p_combined, q_value, verdict, per sample.
VERDICT_VIEW = "CREATE VIEW verdict AS SELECT * FROM read_parquet({file})"
# One row per shard of a dede-shards/1 manifest.json: name, samples, bytes, blake3 (sha256 in folders written
# before issue #22), first_key, last_key.
MANIFEST_VIEW = "CREATE VIEW manifest AS SELECT s.* FROM (SELECT unnest(shards) AS s FROM read_json({file}))"

# Passed to duckdb.connect: no extension is fetched or loaded behind the user's back.
CONNECT_CONFIG = {
    "autoload_known_extensions": False,
    "autoinstall_known_extensions": False,
    "allow_community_extensions": False,
}


def lockdown(allowed_files: Sequence[str]) -> list[str]:
    """Statements run after the views exist: only the views' own files stay readable, nothing is writable
    (COPY, ATTACH, EXPORT and INSTALL need the file system), and the settings cannot be changed back."""
    return [
        f"SET allowed_paths = {literal_list(allowed_files)}",
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ]


def literal(text: str) -> str:
    """A SQL string literal: single quotes doubled."""
    return "'" + text.replace("'", "''") + "'"


def literal_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(literal(item) for item in items) + "]"
