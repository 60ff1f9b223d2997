"""The stage protocol: a stage's jobs, run one by one in any order and finished, write what the one-call library
run writes; a failed job is reported at finish and is the only work a rerun plans."""

from __future__ import annotations

import hashlib

import pytest

from dede_core.stages.clean import CLEAN, CleanRun, CleanSettings, clean, index_tar, sample_keys
from dede_core.io.tarspans import recorded_index
from dede_core.stages.score import SCORE, ScoreRun, ScoreSettings, score_shards
from dede_core.stages.select import Rule
from dede_core.stages.shard import write_shards
from schemas.manifest import read_manifest
from test_clean import T, corpus

SCORING = dict(knn_k=3, batch_size=8, workers=0)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_jobs(stage, jobs) -> dict:
    return {stage.job_name(job): stage.run_job(job) for job in jobs}


def test_clean_jobs_in_reverse_order_write_the_same_bytes(tmp_path):
    shards, scores, _ = corpus(tmp_path)
    clean(shards, scores, tmp_path / "one", Rule.threshold(T), progress=False)
    plan = CLEAN.plan(CleanRun(shards, scores, str(tmp_path / "jobs"), CleanSettings(Rule.threshold(T))))
    jobs = plan.jobs()
    assert [CLEAN.job_name(job) for job in jobs] == ["000000.tar", "000001.tar"]
    result = CLEAN.finish(plan, run_jobs(CLEAN, reversed(jobs)), {})
    assert result.written == ["000000.tar", "000001.tar"]
    for name in ("000000.tar", "000001.tar", "rejected.parquet"):
        assert sha(tmp_path / "jobs" / name) == sha(tmp_path / "one" / name), name


def test_a_failed_clean_job_fails_the_finish_and_is_all_a_rerun_plans(tmp_path):
    shards, scores, _ = corpus(tmp_path)
    run = CleanRun(shards, scores, str(tmp_path / "out"), CleanSettings(Rule.threshold(T)))
    plan = CLEAN.plan(run)
    _, second = plan.jobs()
    with pytest.raises(OSError, match="disk full"):
        CLEAN.finish(plan, run_jobs(CLEAN, [second]), {"000000.tar": OSError("disk full")})
    assert not (tmp_path / "out" / "manifest.json").exists()  # the folder is not complete
    again = CLEAN.plan(run)
    assert [CLEAN.job_name(job) for job in again.jobs()] == ["000000.tar"]
    assert CLEAN.finish(again, run_jobs(CLEAN, again.jobs()), {}).written == ["000000.tar"]
    assert (tmp_path / "out" / "manifest.json").exists()


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory, image_folder):
    root = tmp_path_factory.mktemp("protocol")
    write_shards(str(image_folder), str(root / "shards"), samples_per_shard=8, progress=False)
    return str(root / "shards")


def test_score_groups_in_reverse_order_equal_one_call(tmp_path, six_shards, tiny_detector):
    score_shards(six_shards, detector=tiny_detector, out_dir=str(tmp_path / "one"), progress=False, **SCORING)
    run = ScoreRun(six_shards, tiny_detector, str(tmp_path / "jobs"), ScoreSettings(group_size=4, **SCORING),
                   progress=False)
    plan = SCORE.plan(run)
    assert [SCORE.job_name(job) for job in plan.jobs()] == ["000000..000003", "000004..000005"]
    result = SCORE.finish(plan, run_jobs(SCORE, reversed(plan.jobs())), {})
    assert sorted(result.scored) == [f"{i:06d}.tar" for i in range(6)] and result.samples == result.ok == 48
    for name in [f"{i:06d}.parquet" for i in range(6)] + ["calibration.parquet", "run.json"]:
        assert sha(tmp_path / "jobs" / name) == sha(tmp_path / "one" / name), name


def test_a_score_job_that_raised_fails_its_shards_only(tmp_path, six_shards, tiny_detector):
    run = ScoreRun(six_shards, tiny_detector, str(tmp_path / "out"), ScoreSettings(group_size=2, **SCORING),
                   progress=False)
    plan = SCORE.plan(run)
    broken, *others = plan.jobs()
    result = SCORE.finish(plan, run_jobs(SCORE, others), {"000000..000001": RuntimeError("boom")})
    assert result.failed == {"000000.tar": "RuntimeError: boom", "000001.tar": "RuntimeError: boom"}
    assert sorted(result.scored) == [f"{i:06d}.tar" for i in range(2, 6)]
    assert [job.names for job in SCORE.plan(run).jobs()] == [broken.names]


def test_the_plan_lists_keys_from_the_recorded_spans(six_shards):
    """The duplicate-key check reads no tar when the shard stage recorded its spans, and gets the same keys."""
    for entry in read_manifest(six_shards).shards:
        assert recorded_index(six_shards, entry) is not None
        parsed = [s.key for s in index_tar(f"{six_shards}/{entry.name}").samples]
        assert sample_keys(six_shards, entry) == parsed and len(parsed) == 8
