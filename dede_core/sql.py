"""Read-only DuckDB over a scores folder: the views of schemas/sql.py on a locked-down in-memory connection.

After the views exist, the connection may read only their own files: no COPY/EXPORT to disk, no ATTACH, no
INSTALL/LOAD, no other file, and the settings are locked so a query cannot turn this back on. `run_query` also
accepts only one statement that reads. Output files (`--out`) are written here, by Python, never by the SQL.
A scores folder at a URL (s3://...) is read through its fsspec file system, registered with DuckDB; the same
lock applies (only the views' own objects are readable).
"""

from __future__ import annotations

import math
import os
import posixpath

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dede_core.io import storage
from schemas import sql as views
from dede_core.signals.gather import default_neighbours, neighbours_files
from schemas.names import CALIBRATION, MANIFEST, REJECTED, VERDICT

# Statement types a user query may have: SELECT covers WITH, FROM-first, VALUES, DESCRIBE, SHOW and SUMMARIZE.
READ_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)
_GLOB_CHARS = set("*?[]{}")


def _path(path: str | os.PathLike) -> str:
    path = storage.absolute(path)
    # read_parquet expands glob characters even in a list of files, so such a path would read other files.
    if _GLOB_CHARS & set(path):
        raise ValueError(f"{path} contains one of {''.join(sorted(_GLOB_CHARS))}; rename the folder or file")
    return path


def scores_files(scores_dir: str | os.PathLike) -> list[str]:
    """The per-shard scores files of a folder, sorted: *.parquet except calibration, rejected and temp files."""
    folder = os.fspath(scores_dir)
    if not storage.isdir(folder):
        raise ValueError(f"scores folder {folder} does not exist; run `dede score SHARDS --out {folder}` first")
    names = sorted(
        n for n in storage.listdir(folder)
        if n.endswith(".parquet") and n not in (CALIBRATION, REJECTED) and not n.startswith((".", "_"))
    )
    if not names:
        raise ValueError(f"no scores files (*.parquet) in {folder}; run `dede score SHARDS --out {folder}` first")
    return [_path(storage.join(folder, n)) for n in names]


def _optional_file(path: str | os.PathLike | None, default_name: str, what: str) -> str | None:
    """A file given directly or as the folder holding `default_name`; ValueError when given but absent."""
    if path is None:
        return None
    path = os.fspath(path)
    candidate = storage.join(path, default_name) if storage.isdir(path) else path
    if not storage.isfile(candidate):
        raise ValueError(f"no {what} at {candidate}; give the folder that holds {default_name}, or the file")
    return _path(candidate)


def connect(
    scores_dir: str | os.PathLike,
    *,
    rejected: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
) -> duckdb.DuckDBPyConnection:
    """A locked-down connection with views `scores`, `calibration` (when SCORES/calibration.parquet exists),
    `rejected` (a clean folder or its rejected.parquet; SCORES/rejected.parquet is used when present),
    `verdict` (the clean folder's verdict.parquet, when the rejected table's folder has one), `neighbours` (the
    finished neighbours folder beside SCORES) and `manifest` (a shards folder or its manifest.json, when given)."""
    files = scores_files(scores_dir)
    calibration = storage.join(os.fspath(scores_dir), CALIBRATION)
    calibration = _path(calibration) if storage.isfile(calibration) else None
    if rejected is None and storage.isfile(storage.join(os.fspath(scores_dir), REJECTED)):
        rejected = scores_dir
    rejected = _optional_file(rejected, REJECTED, "rejected table")
    manifest = _optional_file(manifest, MANIFEST, "shards manifest")
    verdict = None if rejected is None else storage.join(posixpath.dirname(rejected), VERDICT)
    verdict = _path(verdict) if verdict is not None and storage.isfile(verdict) else None
    neighbours = [_path(f) for f in neighbours_files(default_neighbours(os.fspath(scores_dir)))]

    # No temp directory: DuckDB adds it (default ./.tmp) to the paths a locked connection may still read and write.
    conn = duckdb.connect(":memory:", config=dict(views.CONNECT_CONFIG) | {"temp_directory": ""})
    try:
        remote = [storage.filesystem(f)[0] for f in files + neighbours + [calibration, rejected, manifest, verdict]
                  if f is not None and storage.is_url(f)]
        for fs in {str(fs.protocol): fs for fs in remote}.values():  # one registration per protocol
            conn.register_filesystem(fs)
        conn.execute(views.SCORES_VIEW.format(files=views.literal_list(files)))
        if neighbours:
            conn.execute(views.NEIGHBOURS_VIEW.format(files=views.literal_list(neighbours)))
        for template, file in ((views.CALIBRATION_VIEW, calibration), (views.REJECTED_VIEW, rejected),
                               (views.MANIFEST_VIEW, manifest), (views.VERDICT_VIEW, verdict)):
            if file is not None:
                conn.execute(template.format(file=views.literal(file)))
        for view in ("scores", "rejected") if rejected else ("scores",):
            _add_source(conn, view)
        allowed = files + neighbours + [f for f in (calibration, rejected, manifest, verdict) if f is not None]
        for statement in views.lockdown(allowed):
            conn.execute(statement)
    except duckdb.Error as e:
        conn.close()
        raise ValueError(f"cannot open the scores in {os.fspath(scores_dir)}: {e}") from None
    return conn


def _add_source(conn: duckdb.DuckDBPyConnection, view: str) -> None:
    """Give a view over files written before the `source` column that column, as NULL."""
    columns = [row[0] for row in conn.execute(f"DESCRIBE {view}").fetchall()]
    if "source" not in columns:
        for statement in views.ADD_SOURCE:
            conn.execute(statement.format(view=view))


def has_view(conn: duckdb.DuckDBPyConnection, name: str) -> bool:
    # fetchall, not fetchone: DuckDB refuses the next query while a result is unfinished.
    return bool(conn.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [name]).fetchall()[0][0])


def _explained_kind(sql: str) -> duckdb.StatementType | None:
    """The type of the statement an EXPLAIN [ANALYZE] [(options)] statement explains; None if unclear."""
    tokens = duckdb.tokenize(sql)
    ends = [pos for pos, _ in tokens[1:]] + [len(sql)]
    words = [(pos, sql[pos:end].strip().upper()) for (pos, kind), end in zip(tokens, ends)
             if kind != duckdb.token_type.comment][1:]  # [0] is EXPLAIN
    if words and words[0][1] in ("ANALYZE", "ANALYSE"):
        words = words[1:]
    depth = 0
    while words and (depth or words[0][1].startswith("(")):
        depth += words[0][1].count("(") - words[0][1].count(")")
        words = words[1:]
    try:
        inner = duckdb.extract_statements(sql[words[0][0]:]) if words else []
    except duckdb.Error:
        inner = []
    return inner[0].type if len(inner) == 1 and inner[0].type != duckdb.StatementType.EXPLAIN else None


def run_query(conn: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """The result of one read-only statement; ValueError (with DuckDB's message) for anything else."""
    if not isinstance(sql, str) or not sql.strip():
        raise ValueError("empty query; give one SELECT statement, e.g. SELECT * FROM scores LIMIT 10")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise ValueError(f"cannot parse the query: {e}") from None
    if len(statements) != 1:
        raise ValueError(f"give exactly one statement, got {len(statements)}; split them into separate queries")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:  # EXPLAIN ANALYZE runs the statement: it must read too
        kind = _explained_kind(statements[0].query)
    if kind not in READ_STATEMENTS:
        what = f"a {kind.name} statement" if kind else "an EXPLAIN of no single statement"
        raise ValueError(f"only queries that read are allowed (SELECT, WITH, FROM, DESCRIBE, SUMMARIZE, EXPLAIN), "
                         f"got {what}; write results with --out instead of COPY")
    try:
        return conn.sql(sql).to_arrow_table()
    except duckdb.Error as e:
        raise ValueError(str(e)) from None


def _cell(value: object, width: int = 40) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        text = f"{value:.6g}" if math.isfinite(value) else str(value)
    else:
        text = str(value).replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def format_table(table: pa.Table, max_rows: int = 50) -> str:
    """Aligned plain text: a header, up to max_rows rows, and the row count."""
    shown = table.slice(0, max_rows)
    names = [str(n) for n in table.column_names]
    columns = [[_cell(v) for v in shown.column(i).to_pylist()] for i in range(table.num_columns)]
    widths = [max([len(n)] + [len(c) for c in col]) for n, col in zip(names, columns)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(col[r].ljust(w) for col, w in zip(columns, widths)).rstrip() for r in range(shown.num_rows)]
    more = f", showing the first {max_rows}" if table.num_rows > max_rows else ""
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}{more})")
    return "\n".join(lines)


def write_result(table: pa.Table, path: str | os.PathLike) -> str:
    """Write a query result to .csv or .parquet (by extension) under a temporary name, then rename."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".parquet"):
        raise ValueError(f"--out {path}: give a file name ending in .csv or .parquet")
    if ext == ".csv":
        nested = [f.name for f in table.schema if pa.types.is_nested(f.type)]
        if nested:
            raise ValueError(f"CSV cannot hold list/struct columns ({', '.join(nested)}); "
                             f"leave them out of the SELECT or write .parquet")
    with storage.AtomicFile(path) as f:
        if ext == ".csv":
            pacsv.write_csv(table, f)
        else:
            pq.write_table(table, f)
    return path

