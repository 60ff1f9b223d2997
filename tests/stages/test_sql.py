"""The DuckDB views answer, and the connection cannot write, attach, load, read other files or unlock itself."""

from __future__ import annotations

import os
import re
import shutil

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dede_core.sql import connect, format_table, run_query, write_result
from schemas.tables import REJECTED
from test_select import png, scores_fixture, write_shards


@pytest.fixture()
def conn(tmp_path):
    scores = str(tmp_path / "scores")
    scores_fixture(scores)
    shards = str(tmp_path / "shards")
    write_shards(shards, [[{"__key__": "k000", "png": png(0)}], [{"__key__": "k001", "png": png(1)}]])
    clean = tmp_path / "clean"
    clean.mkdir()
    pq.write_table(pa.table({"key": ["k003"], "shard": ["000001.tar"], "score": [None], "reason": ["decode_error: x"]},
                            schema=REJECTED.remove(REJECTED.get_field_index("source"))),  # an older file
                   clean / "rejected.parquet")
    c = connect(scores, rejected=str(clean), manifest=shards)
    yield c
    c.close()


def test_views_answer(conn):
    assert run_query(conn, "SELECT count(*) AS n FROM scores").column("n").to_pylist() == [40]
    assert run_query(conn, "SELECT count(*) AS n FROM calibration").column("n").to_pylist() == [200]
    by_shard = run_query(conn, "SELECT shard, count(*) AS n FROM scores GROUP BY shard ORDER BY shard")
    assert by_shard.to_pylist() == [{"shard": "000000.tar", "n": 20}, {"shard": "000001.tar", "n": 20}]
    joined = run_query(conn, "SELECT s.status, r.reason FROM scores s JOIN rejected r USING (key)")
    assert joined.to_pylist() == [{"status": "decode_error", "reason": "decode_error: x"}]
    assert run_query(conn, "FROM manifest SELECT name, samples ORDER BY name").to_pylist() == [
        {"name": "000000.tar", "samples": 1}, {"name": "000001.tar", "samples": 1}]
    assert run_query(conn, "DESCRIBE scores").num_rows == 16
    assert run_query(conn, "SELECT DISTINCT source FROM rejected").to_pylist() == [{"source": None}]  # older file


ATTACKS = [
    "COPY scores TO '{tmp}/out.csv'",
    "COPY (SELECT * FROM scores) TO '{tmp}/out.parquet' (FORMAT parquet)",
    "EXPORT DATABASE '{tmp}/export'",
    "ATTACH '{tmp}/other.duckdb' AS other",
    "ATTACH ':memory:' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('/etc/*')",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "RESET enable_external_access",
    "SET allowed_paths = ['/etc/passwd']",
    "CREATE TABLE t AS SELECT * FROM scores",
    "DROP VIEW scores",
    "SELECT 1; SELECT 2",
    "SELECT 1; COPY scores TO '{tmp}/out.csv'",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_run_query_refuses(conn, tmp_path, attack):
    with pytest.raises(ValueError):
        run_query(conn, attack.format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["clean", "scores", "shards"]  # nothing written
    assert run_query(conn, "SELECT count(*) AS n FROM scores").column("n").to_pylist() == [40]


@pytest.mark.parametrize("attack", [
    "COPY scores TO '{tmp}/out.csv'", "ATTACH '{tmp}/other.duckdb'", "INSTALL httpfs", "LOAD httpfs",
    "SELECT * FROM read_csv('/etc/passwd')", "SET enable_external_access = true", "SET lock_configuration = false",
    "SET autoinstall_known_extensions = true",
])
def test_the_connection_itself_is_locked(conn, tmp_path, attack):
    """Even bypassing run_query's statement check, DuckDB refuses: the lock is in the connection."""
    with pytest.raises(duckdb.Error):
        conn.execute(attack.format(tmp=tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["clean", "scores", "shards"]


def test_format_table_and_writers(conn, tmp_path):
    table = run_query(conn, "SELECT key, score, error FROM scores ORDER BY key")
    text = format_table(table, max_rows=5)
    lines = text.splitlines()
    assert lines[0].split() == ["key", "score", "error"] and len(lines) == 2 + 5 + 1
    assert lines[-1] == "(40 rows, showing the first 5)"
    assert "k004" in text and "k005" not in text
    assert "k003  NULL" in format_table(table.slice(3, 1))
    out = tmp_path / "q.csv"
    write_result(table, out)
    assert pacsv.read_csv(out).column("key").to_pylist() == table.column("key").to_pylist()
    write_result(table, tmp_path / "q.parquet")
    assert pq.read_table(tmp_path / "q.parquet").equals(table)
    with pytest.raises(ValueError, match="csv or .parquet"):
        write_result(table, tmp_path / "q.json")
    with pytest.raises(ValueError, match="list/struct"):
        write_result(run_query(conn, "SELECT [1, 2] AS xs"), tmp_path / "l.csv")


def test_connect_refuses_missing_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        connect(tmp_path / "nope")
    scores = str(tmp_path / "scores")
    scores_fixture(scores)
    with pytest.raises(ValueError, match="no shards manifest"):
        connect(scores, manifest=tmp_path)


def test_html_page_and_exported_images_of_a_result(tmp_path):
    from dede_core.sql_page import inspect_result
    from test_report import CHROMIUM, labelled_corpus, rendered

    shards, scores = labelled_corpus(tmp_path)
    query = "SELECT key, score * 2 AS doubled FROM scores ORDER BY score DESC LIMIT 3"
    c = connect(scores)
    table = run_query(c, query)
    c.close()
    page, exported = str(tmp_path / "page" / "top.html"), str(tmp_path / "eyeball")
    os.makedirs(os.path.dirname(page))
    written = inspect_result(table, scores, query=query, shards_dir=shards, html_out=page, export_dir=exported)
    assert written[0] == page and sorted(os.listdir(exported)) == ["0000-cat_k11.png", "0001-cat_k10.png",
                                                                   "0002-cat_k09.png"]
    text = open(page).read()
    assert "cat/k11" in text and "1200.00" in text and "2400.00" in text and "2 (cow)" in text
    assert text.index("cat/k11") < text.index("cat/k10") < text.index("cat/k09")  # result order
    if CHROMIUM:
        from pathlib import Path

        widths = [int(w) for w in re.findall(r'data-width="(\d+)"', rendered(Path(page)))]
        assert len(widths) == 3 and min(widths) > 0
    with pytest.raises(ValueError, match="no `key` column"):
        inspect_result(table.drop_columns(["key"]), scores, query=query, shards_dir=shards, html_out=page)
    assert inspect_result(table, scores, query=query, html_out=page) == [page]  # SCORES/../shards by default
    lone = tmp_path / "elsewhere" / "scores"
    shutil.copytree(scores, lone)
    with pytest.raises(ValueError, match="pass --shards"):
        inspect_result(table, str(lone), query=query, html_out=page)


def test_the_verdict_and_the_neighbours_join_the_scores_by_key(tmp_path):
    from dede_core.stages.select import Rule, select
    from test_select import lognormal_corpus

    run = tmp_path / "run"
    keys = [r["key"] for r in lognormal_corpus(str(run / "scores"), 300, poisoned=6)]
    (run / "neighbours").mkdir()
    pq.write_table(pa.table({"key": keys, "shard": [f"{i % 3:06d}.tar" for i in range(300)],
                             "kdist_5": [0.2] * 300, "collapse": [10.0] * 300}), run / "neighbours" / "000000.parquet")
    (run / "neighbours" / "summary.json").write_text("{}")
    sel = select(str(run / "scores"), Rule.fdr(0.05))
    (run / "clean").mkdir()
    pq.write_table(sel.verdict.table, run / "clean" / "verdict.parquet")
    pq.write_table(sel.dropped, run / "clean" / "rejected.parquet")
    conn = connect(str(run / "scores"), rejected=str(run / "clean"))
    flagged = conn.sql("SELECT s.key FROM scores s JOIN verdict v USING (shard, key) JOIN neighbours n "
                       "USING (shard, key) WHERE v.verdict ORDER BY s.key").fetchall()
    assert [k for (k,) in flagged] == sorted(sel.dropped.column("key").to_pylist()) and len(flagged) >= 6
    assert conn.sql("SELECT count(*) FROM neighbours").fetchall() == [(300,)]
    with pytest.raises(duckdb.Error):
        conn.sql("COPY verdict TO 'x.csv'").fetchall()
