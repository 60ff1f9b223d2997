"""The review app without a browser: what it shows, and its safety rules (token, Host, read-only queries,
decisions that survive a restart)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
from fastapi.testclient import TestClient

from review_run import FLAGGED, GROUPS, review_run  # noqa: F401 - review_run is a fixture
from dede_core.review import DecisionStore, create_app

TOKEN = "t" * 32
BASE = "http://127.0.0.1:8765"


def client(run: str) -> TestClient:
    return TestClient(create_app(run, token=TOKEN, host="127.0.0.1", port=8765), base_url=BASE,
                      headers={"X-Dede-Token": TOKEN}, raise_server_exceptions=False)


def test_page_summary_groups_flagged_and_map(review_run):
    c = client(review_run)
    assert c.get("/").status_code == 200 and "dede review" in c.get("/").text
    s = c.get("/api/summary").json()
    assert s["flagged"] == len(FLAGGED) and s["clean"]["counts"]["dropped"] == len(FLAGGED)
    groups = {g["id"]: g for g in c.get("/api/groups").json()["groups"]}
    assert set(groups) == {"n1", "n2"} and groups["n1"]["size"] == 4 and groups["n1"]["flagged"] == 2
    members = c.get("/api/group", params={"id": "n1"}).json()["members"]
    assert {m["key"] for m in members} == set(GROUPS["n1"])
    assert all(m["thumbnail"].startswith("data:image/") for m in members)
    rows = c.get("/api/flagged", params={"sort": "key", "order": "asc"}).json()["rows"]
    assert [r["key"] for r in rows] == sorted(FLAGGED)
    assert {r["key"] for r in c.get("/api/flagged", params={"label": "0"}).json()["rows"]} == {"k18", "k21"}
    m = c.get("/api/map").json()
    assert m["method"] in ("PCA", "UMAP") and len(m["points"]) == 24 and sum(p[2] for p in m["points"]) == 6
    assert c.get("/api/thumb", params={"key": "k02"}).headers["content-type"] == "image/png"
    assert c.get("/api/flagged", params={"sort": "nope"}).json()["error"].startswith("sort must be")


def test_token_is_required_and_writes_need_the_header(review_run):
    c = client(review_run)
    bare = TestClient(c.app, base_url=BASE, raise_server_exceptions=False)
    assert bare.get("/").status_code == 401 and "token" in bare.get("/").json()["error"]
    assert bare.get("/api/summary", headers={"X-Dede-Token": "x" * 32}).status_code == 401
    assert bare.get("/api/summary", params={"token": TOKEN}).status_code == 200  # a GET may carry it in the URL
    body = {"keys": ["k01"], "decision": "drop", "note": "sneaky"}
    assert bare.post("/api/decisions", json=body).status_code == 401
    assert bare.post("/api/decisions", params={"token": TOKEN}, json=body).status_code == 401  # header only
    assert not os.path.exists(os.path.join(review_run, "review"))
    assert c.post("/api/decisions", json=body).json() == {"decided": 1}


def test_a_foreign_host_is_refused(review_run):
    c = client(review_run)
    r = c.get("/api/summary", headers={"Host": "evil.example:8765"})
    assert r.status_code == 403 and "Host" in r.json()["error"]
    assert c.get("/api/summary", headers={"Host": "127.0.0.1:9999"}).status_code == 403
    assert c.get("/api/summary", headers={"Host": "localhost:8765"}).status_code == 200


def test_queries_stay_read_only_and_errors_are_json(review_run):
    c = client(review_run)
    ok = c.post("/api/query", json={"sql": "SELECT key, score FROM scores ORDER BY score DESC LIMIT 3"}).json()
    assert [r["key"] for r in ok["rows"]] == ["k23", "k22", "k21"] and ok["thumbnails"]["k23"].startswith("data:")
    target = os.path.join(review_run, "review", "x.csv")
    for sql in (f"COPY (SELECT 1) TO '{target}'", "CREATE TABLE t AS SELECT 1", "SELECT 1; SELECT 2",
                f"SELECT * FROM read_text('{os.path.join(review_run, 'clean', 'summary.json')}')",
                "ATTACH 'x.db' AS x", "SET enable_external_access = true"):
        r = c.post("/api/query", json={"sql": sql})
        assert r.status_code == 400 and r.json()["error"], sql
        assert "Traceback" not in r.text
    assert not os.path.exists(target)
    assert c.post("/api/query", json={"nosql": 1}).status_code == 400
    assert c.post("/api/query", content=b"not json", headers={"Content-Type": "application/json"}).status_code == 422
    assert c.get("/api/group", params={"id": "nope"}).json()["error"].startswith("no group")
    assert c.post("/api/decisions", json={"keys": ["k01"], "decision": "maybe"}).status_code == 400


def test_decisions_survive_a_restart_and_export(review_run):
    c = client(review_run)
    assert c.post("/api/decisions", json={"group": "n1", "decision": "drop", "note": "trigger patch"}).json() == \
        {"decided": 4}
    assert c.post("/api/decisions", json={"keys": ["k23"], "decision": "keep", "note": "clean twin"}).status_code == 200
    again = client(review_run)  # a new app over the same run: read back from RUN/review/decisions.parquet
    rows = {r["key"]: r for r in again.get("/api/decisions").json()["decisions"]}
    assert {k: r["decision"] for k, r in rows.items()} == dict.fromkeys(GROUPS["n1"], "drop") | {"k23": "keep"}
    assert rows["k02"]["group"] == "n1" and rows["k23"]["group"] is None and rows["k23"]["note"] == "clean twin"
    exported = again.get("/api/decisions/export")
    assert exported.status_code == 200 and exported.content == open(DecisionStore(review_run).path, "rb").read()
    assert pq.read_table(DecisionStore(review_run).path).num_rows == 5
    assert os.listdir(os.path.join(review_run, "review")) == ["decisions.parquet"]  # no temporaries left
