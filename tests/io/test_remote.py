"""Remote storage: shards, scores and the cleaned corpus on S3 (a moto server on loopback), through fsspec;
the bytes equal a local run's, reruns skip finished shards, and `dede sql` reads the remote scores read-only."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pyarrow.parquet as pq
import pytest

from dede_core.stages.clean import clean
from dede_core.stages.score import score_shards
from dede_core.detector.scorer import ScoreConfig
from dede_core.stages.select import Rule
from dede_core.stages.shard import write_shards
from dede_core.sql import connect, run_query
from flows.cli import main

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "dede-test"
SCORE = dict(score=ScoreConfig(), knn_k=3, batch_size=8, workers=0, device="cpu", progress=False)
RULE = dataclasses.replace(Rule.quantile(0.9), allow_weak_detector=True)  # tiny test detectors


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the environment that points s3fs at it (dummy credentials)."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    yield fs
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory, image_folder, tiny_detector):
    """The same corpus through shard -> score -> clean twice: into a local folder and into s3://."""
    local = tmp_path_factory.mktemp("local")
    remote = f"s3://{BUCKET}/run"
    for root in (str(local), remote):
        write_shards(str(image_folder), f"{root}/shards", samples_per_shard=20, progress=False)
        score_shards(f"{root}/shards", detector=tiny_detector, out_dir=f"{root}/scores", **SCORE)
        clean(f"{root}/shards", f"{root}/scores", f"{root}/clean", RULE, progress=False)
    return local, remote


def test_remote_shards_scores_and_clean_equal_local_bytes(s3, runs):
    local, remote = runs
    pairs = {"shards": ["000000.tar", "000001.tar", "000002.tar"],
             "scores": ["000000.parquet", "000001.parquet", "000002.parquet", "calibration.parquet"],
             "clean": ["000000.tar", "000001.tar", "000002.tar"]}
    for stage, names in pairs.items():
        for name in names:
            assert digest(s3.cat_file(f"{remote}/{stage}/{name}")) == digest((local / stage / name).read_bytes()), \
                f"{stage}/{name}"
    assert pq.read_table(s3.open(f"{remote}/clean/rejected.parquet")).equals(
        pq.read_table(local / "clean" / "rejected.parquet"))
    # every completion record is there, and no temporary object was left behind
    for path in ("shards/manifest.json", "scores/run.json", "scores/_done/000002.json", "clean/_done/000002.json",
                 "clean/manifest.json", "clean/summary.json", "clean/clean_config.json"):
        assert s3.isfile(f"{remote}/{path}"), path
    assert not [p for p in s3.find(f"{BUCKET}/run") if p.endswith(".tmp")]


def test_remote_reruns_skip_finished_work(s3, runs, tiny_detector):
    _, remote = runs
    again = score_shards(f"{remote}/shards", detector=tiny_detector, out_dir=f"{remote}/scores", **SCORE)
    assert again.scored == [] and len(again.skipped) == 3
    cleaned = clean(f"{remote}/shards", f"{remote}/scores", f"{remote}/clean", RULE, progress=False)
    assert cleaned.written == [] and cleaned.counts.total == 48
    with pytest.raises(ValueError, match="other settings"):  # mixing settings is refused remotely too
        score_shards(f"{remote}/shards", detector=tiny_detector, out_dir=f"{remote}/scores",
                     **(SCORE | {"knn_k": 2}))


def test_a_lost_remote_shard_file_is_redone(s3, runs, tiny_detector):
    local, remote = runs
    s3.rm_file(f"{remote}/scores/000001.parquet")  # marker without its file: the shard is not done
    again = score_shards(f"{remote}/shards", detector=tiny_detector, out_dir=f"{remote}/scores", **SCORE)
    assert again.scored == ["000001.tar"]
    assert digest(s3.cat_file(f"{remote}/scores/000001.parquet")) == digest(
        (local / "scores" / "000001.parquet").read_bytes())


def test_dede_sql_reads_remote_scores(s3, runs, capsys):
    local, remote = runs
    conn = connect(f"{remote}/scores", rejected=f"{remote}/clean", manifest=f"{remote}/shards")
    try:
        table = run_query(conn, "SELECT count(*) AS n, count(DISTINCT shard) AS shards FROM scores")
        assert table.to_pylist() == [{"n": 48, "shards": 3}]
        assert run_query(conn, "SELECT count(*) AS n FROM rejected").to_pylist() == [{"n": 5}]
        assert run_query(conn, "SELECT sum(samples) AS n FROM manifest").to_pylist() == [{"n": 48}]
        with pytest.raises(ValueError):  # only the views' own objects are readable
            run_query(conn, f"SELECT * FROM read_json('{remote}/clean/summary.json')")
        with pytest.raises(ValueError):
            run_query(conn, f"COPY (SELECT 1) TO '{remote}/x.csv'")
    finally:
        conn.close()
    assert not s3.exists(f"{remote}/x.csv")
    local_top = connect(local / "scores")
    expected = run_query(local_top, "SELECT key, score FROM scores ORDER BY score DESC LIMIT 3").to_pylist()
    local_top.close()
    assert main(["sql", f"{remote}/scores", "SELECT key, score FROM scores ORDER BY score DESC LIMIT 3"]) == 0
    printed = capsys.readouterr().out
    assert all(row["key"] in printed for row in expected) and "(3 rows)" in printed


def test_dede_clean_command_writes_report_to_s3(s3, runs):
    _, remote = runs
    out = f"{remote}/clean-cli"
    assert main(["clean", "--allow-weak-detector", f"{remote}/shards", "--scores", f"{remote}/scores", "--out", out, "--quantile", "0.9"]) == 0
    assert s3.isfile(f"{out}/manifest.json") and b"dede selection report" in s3.cat_file(f"{out}/report.html")
    assert s3.cat_file(f"{out}/000000.tar") == s3.cat_file(f"{remote}/clean/000000.tar")
