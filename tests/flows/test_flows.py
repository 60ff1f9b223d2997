"""Flows: sanitize end to end on 48 images, its rerun does no work, score groups in parallel equal one call."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from dede_core.detector.checkpoint import load_checkpoint
from dede_core.detector.train import TrainConfig
from dede_core.stages.clean import CleanSettings
from dede_core.stages.score import ScoreSettings, score_shards
from dede_core.detector.scorer import ScoreConfig
from dede_core.stages.select import Rule
from flows import is_transient, retry_transient
from flows.runners import Engine
from flows.sanitize import ARTIFACT_KEY, SanitizeConfig, sanitize_flow
from flows.score import ShardsFailed, score_flow
from flows.shard import ShardSettings
from flows.train import TrainSettings

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
SHARDS = ["000000.tar", "000001.tar", "000002.tar"]
SCORE = dict(knn_k=3, batch_size=16, workers=0, device="cpu")
WEAK_OK = dataclasses.replace(Rule.quantile(0.9), allow_weak_detector=True)  # 1-epoch test detectors fail the health check


def sanitize_config(rule: Rule, epochs: int = 1) -> SanitizeConfig:
    """1 epoch of a tiny detector, 20 samples a shard, SCORE's scoring settings."""
    return SanitizeConfig(training=TrainSettings(overrides=TINY, train=TrainConfig(epochs=epochs, batch_size=16)),
                          shard=ShardSettings(samples_per_shard=20), score=ScoreSettings(**SCORE),
                          clean=CleanSettings(rule=rule))


def tree(folder) -> dict[str, tuple[int, str]]:
    """relative path -> (mtime_ns, sha256) of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def samples(folder, names=SHARDS) -> dict[str, dict]:
    """key -> every member's bytes, read back with webdataset."""
    urls = [os.path.join(folder, n) for n in names]
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
            for s in wds.WebDataset(urls, shardshuffle=False)}


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory, image_folder, encoder_spec, prefect_harness):
    run = tmp_path_factory.mktemp("run")
    config = sanitize_config(WEAK_OK)
    first = sanitize_flow(str(image_folder), encoder_spec, str(run), config)
    before = tree(run)
    second = sanitize_flow(str(image_folder), encoder_spec, str(run), config)
    return run, first, second, before


def test_sanitize_writes_every_stage(sanitized):
    run, result, _, _ = sanitized
    for path in ["shards/manifest.json", "detector/detector.pt", "scores/run.json", "scores/calibration.parquet",
                 "clean/rejected.parquet", "clean/summary.json", "clean/manifest.json", "report.html",
                 "sanitize.json"] + [f"shards/{n}" for n in SHARDS] + [f"clean/{n}" for n in SHARDS]:
        assert (run / path).is_file(), path
    assert sorted(p.name for p in (run / "scores").glob("[0-9]*.parquet")) == ["000000.parquet", "000001.parquet",
                                                                               "000002.parquet"]
    assert result["counts"]["samples"] == 48 and result["counts"]["clean"]["total"] == 48
    assert "<h1>dede selection report</h1>" in (run / "report.html").read_text()


def test_cleaned_shards_hold_exactly_the_kept_keys_byte_for_byte(sanitized):
    run, result, _, _ = sanitized
    source, cleaned = samples(run / "shards"), samples(run / "clean")
    rejected = pq.read_table(run / "clean" / "rejected.parquet").column("key").to_pylist()
    assert len(source) == 48 and len(rejected) == len(set(rejected))
    assert set(cleaned) | set(rejected) == set(source) and not set(cleaned) & set(rejected)
    assert all(cleaned[k] == source[k] for k in cleaned)
    scores = pq.read_table(sorted((run / "scores").glob("[0-9]*.parquet")), columns=["key", "score"]).to_pydict()
    threshold = result["threshold"]
    assert set(rejected) == {k for k, s in zip(scores["key"], scores["score"]) if s > threshold}
    assert len(rejected) == result["counts"]["clean"]["dropped"] == 5  # quantile 0.9 of 48 distinct scores


def test_run_manifest_and_artifact(sanitized):
    from prefect.artifacts import Artifact

    run, result, _, _ = sanitized
    record = json.loads((run / "sanitize.json").read_text())
    assert record["format"] == "dede-sanitize/1"
    assert set(record["versions"]) == {"dede", "torch", "prefect", "duckdb", "pyarrow", "webdataset", "timm"}
    assert record["versions"]["prefect"].startswith("3.")
    assert record["detector"]["hash"] == load_checkpoint(run / "detector" / "detector.pt").content_hash
    assert record["counts"]["scores"] == {"rows": 48, "ok": 48, "decode_error": 0, "read_error": 0, "skipped": 0}
    assert record["counts"]["clean"]["kept"] + record["counts"]["clean"]["dropped"] == 48
    assert set(record["timings"]) == {"shard", "train", "score", "neighbours", "clean"}
    assert (run / "neighbours" / "summary.json").is_file() and record["work"]["neighbours"]["recomputed"]
    assert record["config"]["rule"] == WEAK_OK.to_dict() and record["config"]["epochs"] == 1
    assert record["selection"]["threshold"] == result["threshold"]
    health = record["detector"]["health"]  # the 1-epoch test detector fails it: said in the record and artifact
    assert health["passed"] is False and health["embedding_reliance"] < health["floor"]
    artifact = Artifact.get(ARTIFACT_KEY)
    assert artifact is not None and "| 48 | 3 | 48 |" in artifact.data and "CANNOT FIND BACKDOORS" in artifact.data


def test_stages_publish_progress_the_flagged_samples_and_the_report(sanitized):
    """Where users look: the Prefect run pages show each stage's jobs done, the most-flagged samples and a link
    to report.html."""
    from prefect.artifacts import Artifact

    run = sanitized[0]
    for stage in ("score", "clean"):  # the first run scored and cleaned every shard
        progress = Artifact.get(f"dede-{stage}-progress")
        assert progress is not None and float(progress.data) == 100.0
    flagged = json.loads(Artifact.get("dede-clean-flagged").data)
    dropped = pq.read_table(run / "clean" / "rejected.parquet").to_pylist()
    top = sorted((r for r in dropped if r["score"] is not None), key=lambda r: -r["score"])[:len(flagged)]
    assert flagged and [r["key"] for r in flagged] == [r["key"] for r in top]
    assert f"file://{run / 'report.html'}" in Artifact.get("dede-clean-report").data


def test_second_run_does_no_work_and_changes_nothing(sanitized):
    run, first, second, before = sanitized
    assert tree(run) == before  # same bytes and mtimes: nothing was scored, cleaned or rewritten
    assert second["counts"] == first["counts"] and second["threshold"] == first["threshold"]


def test_sanitize_rerun_over_a_grown_corpus_picks_up_the_new_images(image_folder, encoder_spec, tmp_path,
                                                                    prefect_harness):
    from prefect.artifacts import Artifact

    corpus, run = tmp_path / "corpus", tmp_path / "run"
    shutil.copytree(image_folder, corpus)
    rule = dataclasses.replace(Rule.fpr(0.2), allow_weak_detector=True)
    first = sanitize_flow(str(corpus), encoder_spec, str(run), sanitize_config(rule))
    detector = tree(run / "detector")
    shutil.copy(image_folder / "b" / "img_000.png", corpus / "a" / "new_0.png")  # two new images, one removed
    shutil.copy(image_folder / "a" / "img_001.png", corpus / "a" / "new_1.png")
    os.unlink(next((corpus / "b").glob("*.png")))
    second = sanitize_flow(str(corpus), encoder_spec, str(run), sanitize_config(rule))
    assert second["work"]["shard"] | {"new_shards": None} == {"added": 2, "changed": 0, "removed": 1,
                                                              "unchanged": 47, "new_shards": None, "samples": 50,
                                                              "shards": 4}
    assert second["work"]["score"] == {"scored": 1, "already_done": 3}
    assert tree(run / "detector") == detector  # the first run's detector scores the new images
    assert second["threshold"] == first["threshold"]  # --fpr: from the calibration images, it does not move
    assert second["counts"]["clean"]["total"] == 50 and second["counts"]["retired"] == 1
    reasons = pq.read_table(run / "clean" / "rejected.parquet").column("reason").to_pylist()
    assert reasons.count("source_removed") == 1
    record = json.loads((run / "sanitize.json").read_text())
    assert record["work"]["shard"]["added"] == 2 and "2 added" in Artifact.get(ARTIFACT_KEY).data
    with pytest.raises(ValueError, match="epochs"):
        sanitize_flow(str(corpus), encoder_spec, str(run), sanitize_config(rule, epochs=2))


def test_parallel_groups_equal_one_score_call(sanitized, tmp_path):
    run = sanitized[0]
    shards, detector = str(run / "shards"), str(run / "detector" / "detector.pt")
    score_shards(shards, detector=detector, out_dir=str(tmp_path / "one"), score=ScoreConfig(), progress=False, **SCORE)
    summary = score_flow(shards, detector, str(tmp_path / "flow"), ScoreSettings(group_size=2, **SCORE),
                         Engine(max_parallel=2))
    assert sorted(summary["scored"]) == SHARDS and summary["samples"] == summary["ok"] == 48
    for name in ["000000.parquet", "000001.parquet", "000002.parquet", "calibration.parquet"]:
        one, flow = pq.read_table(tmp_path / "one" / name), pq.read_table(tmp_path / "flow" / name)
        assert flow.equals(one, check_metadata=True), name
        # and the same scores as the sanitize run's own (group size 1, sequential)
        assert flow.equals(pq.read_table(run / "scores" / name)), name


def test_a_failed_shard_keeps_the_others_and_fails_at_the_end(sanitized, tmp_path):
    run = sanitized[0]
    shards = tmp_path / "shards"
    shutil.copytree(run / "shards", shards)
    with open(shards / "000001.tar", "ab") as f:
        f.write(b"\0" * 512)  # no longer the size the manifest says: the scorer refuses this shard
    with pytest.raises(ShardsFailed, match="1 of 3 shards") as info:
        score_flow(str(shards), str(run / "detector" / "detector.pt"), str(tmp_path / "scores"),
                   ScoreSettings(**SCORE), Engine(max_parallel=2))
    assert list(info.value.failed) == ["000001.tar"]
    assert sorted(p.name for p in (tmp_path / "scores").glob("[0-9]*.parquet")) == ["000000.parquet",
                                                                                   "000002.parquet"]


def test_only_transient_errors_are_retried():
    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self, raise_on_failure=True):
            return self.exc

    assert is_transient(TimeoutError()) and is_transient(ConnectionResetError()) and is_transient(OSError(5, "EIO"))
    assert not is_transient(ValueError("bad rule")) and not is_transient(FileNotFoundError(2, "gone"))
    assert retry_transient(None, None, State(TimeoutError())) is True
    assert retry_transient(None, None, State(ValueError("x"))) is False


def test_retry_condition_sees_the_task_exception(prefect_harness):
    from prefect import flow, task

    calls = []

    @task(retries=1, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky(exc_type):
        calls.append(exc_type)
        if len(calls) == 1 or exc_type is ValueError:
            raise exc_type("first try")
        return "ok"

    @flow
    def run(exc_type):
        return flaky(exc_type)

    assert run(TimeoutError) == "ok" and calls == [TimeoutError, TimeoutError]  # transient: retried
    calls.clear()
    with pytest.raises(ValueError):
        run(ValueError)
    assert calls == [ValueError]  # not transient: no retry


def test_a_group_that_raises_does_not_stop_the_others(sanitized, tmp_path, monkeypatch):
    import dede_core.stages.score

    real = dede_core.stages.score.score_job

    def broken_for_000001(job):
        if "000001.tar" in job.names:
            raise RuntimeError("boom")
        return real(job)

    monkeypatch.setattr(dede_core.stages.score, "score_job", broken_for_000001)
    run = sanitized[0]
    with pytest.raises(ShardsFailed) as info:
        score_flow(str(run / "shards"), str(run / "detector" / "detector.pt"), str(tmp_path / "scores"),
                   ScoreSettings(**SCORE))
    assert info.value.failed == {"000001.tar": "RuntimeError: boom"}
    assert sorted(p.name for p in (tmp_path / "scores").glob("[0-9]*.parquet")) == ["000000.parquet",
                                                                                   "000002.parquet"]
