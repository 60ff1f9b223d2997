"""Scale-out: the score and clean flows on a 2-process Dask cluster write the same bytes as a local run, spread
shards over both workers and load the detector once per worker; GPU workers are pinned one per GPU and a
GPU task never shares its GPU (tested with a fake GPU count: this machine has none)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import time

import cloudpickle
import pyarrow.parquet as pq
import pytest
from prefect import task
from prefect.cache_policies import NONE

from dede_core.stages.shard import write_shards
from dede_core.stages.clean import CleanSettings
from dede_core.stages.score import ScoreSettings
from dede_core.stages.select import Rule
from flows.clean import clean_flow
from flows.runners import Engine, ShardRunner, parse_runner, plan_cluster, start_cluster
from flows.score import score_flow

distributed = pytest.importorskip("distributed")
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's own tasks travel to the workers

SCORE = ScoreSettings(knn_k=3, batch_size=8, workers=0, device="cpu")
RULE = CleanSettings(Rule("quantile", 0.9, "score", allow_weak_detector=True))  # tiny detectors


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, image_folder, tiny_detector):
    root = tmp_path_factory.mktemp("scaleout")
    write_shards(str(image_folder), str(root / "shards"), samples_per_shard=8, progress=False)
    return root, str(root / "shards"), tiny_detector


@contextlib.contextmanager
def local_cluster(**kwargs):
    """A LocalCluster on loopback. Its nannies get distributed's fixed few seconds to exit at close; on a loaded
    machine they may need longer, and a late exit at teardown is no failure of the code under test (the
    processes go with this one)."""
    cluster = distributed.LocalCluster(processes=True, dashboard_address=":0", host="127.0.0.1", **kwargs)
    try:
        yield cluster
    finally:
        try:
            cluster.close(timeout=120)
        except (TimeoutError, asyncio.TimeoutError, asyncio.CancelledError):
            pass


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(n_workers=2, threads_per_worker=1) as c:
        yield c


@pytest.fixture(scope="module")
def runs(corpus, cluster, prefect_harness):
    root, shards, detector = corpus
    address = "dask://" + cluster.scheduler_address.removeprefix("tcp://")
    out = {}
    for name, runner in (("local", "local"), ("dask", address)):
        scored = score_flow(shards, detector, str(root / name / "scores"), SCORE, Engine(runner))
        cleaned = clean_flow(shards, str(root / name / "scores"), str(root / name / "clean"), RULE, Engine(runner),
                             report=False)
        out[name] = (root / name, scored, cleaned)
    return out


def test_dask_spreads_shards_over_two_workers(runs):
    _, scored, cleaned = runs["dask"]
    assert sorted(scored["workers"]) == [f"{i:06d}.tar" for i in range(6)]
    assert len(set(scored["workers"].values())) == 2, scored["workers"]  # two worker processes scored shards
    assert os.getpid() not in {int(w.rsplit(":", 1)[1]) for w in scored["workers"].values()}
    assert len(cleaned["workers"]) == 6 and len(set(cleaned["workers"].values())) == 2, cleaned["workers"]


def test_dask_outputs_equal_a_local_run(runs):
    local, dask = runs["local"][0], runs["dask"][0]
    names = sorted(p.name for p in (local / "scores").glob("*.parquet"))
    assert len(names) == 7  # six shards and the calibration
    for name in names:  # bitwise-equal Parquet files
        assert sha(dask / "scores" / name) == sha(local / "scores" / name), name
    tars = sorted(p.name for p in (local / "clean").glob("*.tar"))
    assert len(tars) == 6
    for name in tars:  # byte-equal cleaned shards
        assert sha(dask / "clean" / name) == sha(local / "clean" / name), name
    assert pq.read_table(dask / "clean" / "rejected.parquet").equals(pq.read_table(local / "clean" /
                                                                                   "rejected.parquet"))
    assert runs["dask"][2]["counts"] == runs["local"][2]["counts"]
    assert runs["dask"][2]["counts"]["dropped"] == 5  # quantile 0.9 of 48 distinct scores


def test_detector_is_loaded_once_per_worker(runs, corpus, cluster):
    from distributed import Client

    detector = os.path.realpath(corpus[2])

    def loads():
        from dede_core.detector.cache import LOADS

        return LOADS[detector]

    with Client(cluster.scheduler_address) as client:
        per_worker = client.run(loads)
    tasks = len(runs["dask"][1]["workers"])
    assert tasks == 6 and sorted(per_worker.values()) == [1, 1], per_worker  # 6 tasks, one load per process


def test_a_rerun_on_dask_does_no_work(runs, corpus):
    root, shards, _ = corpus
    before = {p.name: p.stat().st_mtime_ns for p in (root / "dask" / "clean").glob("*.tar")}
    again = clean_flow(shards, str(root / "dask" / "scores"), str(root / "dask" / "clean"), RULE,
                       Engine("dask", dask_workers=1), report=False)
    assert again["written"] == [] and again["workers"] == {}
    assert {p.name: p.stat().st_mtime_ns for p in (root / "dask" / "clean").glob("*.tar")} == before


def test_runner_parsing():
    assert parse_runner("local").kind == "local"
    assert parse_runner("dask", workers=3).workers == 3
    assert parse_runner("dask://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    for bad in ("ray", "dask://", "spark://x:1"):
        with pytest.raises(ValueError, match="--runner must be"):
            parse_runner(bad)
    with pytest.raises(ValueError, match="existing one"):
        parse_runner("dask://h:1", workers=2)


def test_gpu_plan_one_pinned_process_per_gpu():
    plan = plan_cluster(gpus=4, cpus=32)
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in plan.workers] == ["0", "1", "2", "3"]
    assert all(w.resources == {"GPU": 1} for w in plan.workers)
    assert plan.decode_workers == 7  # (32 - 4) // 4 decoding processes per GPU task
    assert plan_cluster(gpus=2, cpus=2).decode_workers == 0
    pinned = plan_cluster(gpus=2, cpus=8, visible=["5", "7"])  # this process may see only some GPUs itself
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in pinned.workers] == ["5", "7"]
    cpu_plan = plan_cluster(gpus=0, cpus=8, workers=4)
    assert len(cpu_plan.workers) == 4 and cpu_plan.torch_threads == 2
    assert all(w.resources == {} and "CUDA_VISIBLE_DEVICES" not in w.env for w in cpu_plan.workers)


def test_gpu_workers_see_only_their_gpu():
    from distributed import Client

    def inside():
        import multiprocessing

        import torch

        return (os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid(), torch.get_num_threads(),
                multiprocessing.current_process().daemon)

    with start_cluster(plan_cluster(gpus=2, cpus=2)) as cluster, Client(cluster) as client:
        seen = list(client.run(inside).values())
        resources = {w["name"]: w["resources"] for w in client.scheduler_info()["workers"].values()}
    assert sorted(env for env, *_ in seen) == ["0", "1"] and len({pid for _, pid, *_ in seen}) == 2
    assert resources == {"gpu0": {"GPU": 1}, "gpu1": {"GPU": 1}}
    assert all(threads == 1 and not daemon for *_, threads, daemon in seen)  # may start decoding processes


def test_cpu_workers_share_the_cores():
    from distributed import Client

    with start_cluster(plan_cluster(gpus=0, cpus=4, workers=2)) as cluster, Client(cluster) as client:
        threads = client.run(lambda: __import__("torch").get_num_threads())
    assert sorted(threads.values()) == [2, 2]


@task(cache_policy=NONE)
def hold_gpu(seconds: float) -> tuple[float, float, int]:
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic(), os.getpid()


def _overlaps(spans) -> bool:
    spans = sorted(spans)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_gpu_tasks_never_share_a_gpu(prefect_harness):
    """One worker with two task threads but one GPU: GPU tasks run one after the other, CPU tasks together."""
    from prefect import flow

    @flow
    def run(gpu: bool, address: str):
        with ShardRunner(parse_runner(address), gpu=gpu) as pool:
            return pool.run([(hold_gpu, {"seconds": 1.0}) for _ in range(3)])

    with local_cluster(n_workers=1, threads_per_worker=2, resources={"GPU": 1}) as c:
        address = "dask://" + c.scheduler_address.removeprefix("tcp://")
        gpu_spans, cpu_spans = run(True, address), run(False, address)
    assert len({pid for *_, pid in gpu_spans}) == 1  # one worker process ran them all
    assert not _overlaps([(s, e) for s, e, _ in gpu_spans])
    assert _overlaps([(s, e) for s, e, _ in cpu_spans])  # the same worker does overlap tasks that need no GPU


def test_dede_score_and_clean_commands_with_runner_dask(runs, corpus, tmp_path):
    """The commands as a user runs them: `dede score` in a fresh process with no PREFECT_API_URL (a temporary
    server the Dask workers must be told about), then `dede clean`; the bytes equal the local run's."""
    import subprocess

    from flows.cli import main

    _, shards, detector = corpus
    local = runs["local"][0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "score", shards, "--detector", detector, "--out",
                           str(tmp_path / "scores"), "--runner", "dask", "--dask-workers", "2", "--device", "cpu",
                           "--workers", "0", "--knn-k", "3", "--batch-size", "8"],
                          env=env | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "scored 6 shards (48 samples) on 2 worker processes" in done.stdout
    for path in sorted((local / "scores").glob("*.parquet")):
        assert sha(tmp_path / "scores" / path.name) == sha(path), path.name
    assert main(["clean", "--allow-weak-detector", shards, "--scores", str(tmp_path / "scores"), "--out", str(tmp_path / "clean"),
                 "--quantile", "0.9", "--no-report", "--runner", "dask", "--dask-workers", "2"]) == 0
    for path in sorted((local / "clean").glob("*.tar")):
        assert sha(tmp_path / "clean" / path.name) == sha(path), path.name
