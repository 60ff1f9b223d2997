"""The scheduled `sanitize` deployment of infra/prefect.yaml on a real local Prefect server: create the process
work pool, `prefect deploy`, start a process worker, trigger a run, wait for it, check the cleaned corpus and
that the cron schedule put runs on the calendar; then stop everything. Loopback only, a temporary PREFECT_HOME."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import webdataset as wds

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
PARAMS = {"config": {  # flows/sanitize.py SanitizeConfig, nested as a deployment holds it
    "training": {"overrides": TINY, "train": {"epochs": 1, "batch_size": 16}}, "shard": {"samples_per_shard": 20},
    "score": {"knn_k": 3, "batch_size": 16, "workers": 0},
    # a 1-epoch detector fails the health check: this test is about scheduling, not detection
    "clean": {"rule": {"kind": "fpr", "value": 0.2, "column": "score", "allow_weak_detector": True}}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server exited"
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api} not healthy after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started (new session), SIGKILL what is left after 15 s."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(proc.pid, 0)  # children of the group still alive?
        except ProcessLookupError:
            return


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def server(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                        "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
                        "PREFECT_WORKER_QUERY_SECONDS": "2"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[subprocess.Popen] = [proc]
    try:
        wait_healthy(api, proc)
        yield api, env, started, tmp_path
    finally:
        for p in reversed(started):
            stop(p)
        log.close()
        assert not any(group_alive(p.pid) for p in started), "a server or worker process was left running"
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections may linger in TIME_WAIT
            s.bind(("127.0.0.1", port))  # nothing listens on the port any more


def wait_final(api: str, run_id: str, timeout: float = 150) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{api}/flow_runs/{run_id}").json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {run_id} not finished after {timeout} s")


def prefect(env: dict, *args: str, timeout: float = 120) -> str:
    done = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def grow(corpus: Path, n: int) -> list[str]:
    """n new PNGs in the corpus' class folders; their keys."""
    from PIL import Image

    from conftest import smooth_images

    keys = []
    for i, image in enumerate(smooth_images(n, seed=99)):
        key = f"{'ab'[i % 2]}/new_{i:03d}"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(corpus / f"{key}.png")
        keys.append(key)
    return keys


def test_scheduled_sanitize_deployment_runs_on_a_process_worker(server, image_folder, encoder_spec):
    api, env, started, tmp = server
    run_dir, corpus = tmp / "run", tmp / "corpus"
    shutil.copytree(image_folder, corpus)  # grown below: the session's image folder stays as it is
    env = env | {"DEDE_HOME": str(REPO), "DEDE_CORPUS": str(corpus), "DEDE_ENCODER": encoder_spec,
                 "DEDE_RUN": str(run_dir)}
    timings = {}
    t0 = time.monotonic()
    prefect(env, "work-pool", "create", "dede-process", "--type", "process")
    # The yaml's parameters (src, encoder, out from the environment) plus tiny training and scoring settings,
    # merged in at deploy time: the manual run and the runs the schedule creates use the same ones.
    prefect(env, "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--name", "sanitize",
            "--params", json.dumps(PARAMS))
    timings["deploy_s"] = time.monotonic() - t0
    worker_log = open(tmp / "worker.log", "wb")
    started.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "dede-process", "--type", "process"],
                                    env=env, cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT,
                                    start_new_session=True))
    t0 = time.monotonic()
    out = prefect(env, "deployment", "run", "dede-sanitize/sanitize", "--watch", "--watch-interval", "2",
                  "--watch-timeout", "150", timeout=170)
    timings["run_s"] = time.monotonic() - t0
    worker_log.close()

    deployment = httpx.get(f"{api}/deployments/name/dede-sanitize/sanitize").json()
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]
    assert deployment["parameters"] == PARAMS | {"src": str(corpus), "encoder": encoder_spec,
                                                 "out": str(run_dir)}
    runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}}).json()
    manual = [r for r in runs if not r["auto_scheduled"]]
    scheduled = [r for r in runs if r["auto_scheduled"]]
    assert [r["state_type"] for r in manual] == ["COMPLETED"], out
    assert scheduled and all(r["state_type"] == "SCHEDULED" for r in scheduled)  # the cron schedule is registered
    assert all(r["expected_start_time"].endswith(("T03:00:00Z", "T03:00:00+00:00")) for r in scheduled)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    # One run the cron schedule created, moved from tomorrow 03:00 UTC to now: the worker picks it up. Over an
    # unchanged corpus it does no new work and rewrites nothing.
    t0 = time.monotonic()
    cron_run = min(scheduled, key=lambda r: r["expected_start_time"])
    now = datetime.now(timezone.utc).isoformat()
    moved = httpx.post(f"{api}/flow_runs/{cron_run['id']}/set_state", json={"force": True, "state": {
        "type": "SCHEDULED", "name": "Scheduled", "state_details": {"scheduled_time": now}}})
    assert moved.status_code in (200, 201), moved.text
    cron_run = wait_final(api, cron_run["id"])
    timings["scheduled_run_s"] = time.monotonic() - t0
    assert cron_run["state_type"] == "COMPLETED" and cron_run["auto_scheduled"], cron_run["state"]
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before

    record = json.loads((run_dir / "sanitize.json").read_text())
    assert record["counts"]["samples"] == 48 and record["counts"]["clean"]["total"] == 48
    cleaned = {s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (run_dir / "clean").glob("*.tar")),
                                                    shardshuffle=False)}
    rejected = set(pq.read_table(run_dir / "clean" / "rejected.parquet").column("key").to_pylist())
    dropped = record["counts"]["clean"]["dropped"]
    assert len(rejected) == dropped and 0 < dropped < 48 and len(cleaned) == 48 - dropped
    assert not cleaned & rejected and (run_dir / "report.html").is_file()

    # One run at a time (concurrency_limit 1, ENQUEUE): two runs asked for at once over a grown corpus; the
    # second waits for the first, which picks up the new images; the second finds nothing new to do.
    assert deployment["global_concurrency_limit"]["limit"] == 1, deployment
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE", deployment
    new_keys = grow(corpus, 12)
    t0 = time.monotonic()
    ids = [re.search(r"UUID: ([0-9a-f-]{36})", prefect(env, "deployment", "run", "dede-sanitize/sanitize")).group(1)
           for _ in range(2)]
    pair = [wait_final(api, run_id, timeout=400) for run_id in ids]
    timings["two_runs_s"] = time.monotonic() - t0
    assert [r["state_type"] for r in pair] == ["COMPLETED", "COMPLETED"], [r["state"] for r in pair]
    first, second = sorted(pair, key=lambda r: r["start_time"])
    assert second["start_time"] >= first["end_time"], (first, second)  # never both running
    history = [s["name"] for r in pair for s in httpx.get(f"{api}/flow_run_states/",
                                                          params={"flow_run_id": r["id"]}).json()]
    assert "AwaitingConcurrencySlot" in history, history  # the server held the second run back
    record = json.loads((run_dir / "sanitize.json").read_text())
    assert record["counts"]["samples"] == 60 and record["counts"]["clean"]["total"] == 60
    assert record["work"]["shard"]["added"] == 12 and record["work"]["score"]["scored"] >= 1
    cleaned = {s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (run_dir / "clean").glob("*.tar")),
                                                    shardshuffle=False)}
    rejected = set(pq.read_table(run_dir / "clean" / "rejected.parquet").column("key").to_pylist())
    assert set(new_keys) <= cleaned | rejected and len(cleaned | rejected) == 60
    evidence = {"deployment": f"dede-sanitize/{deployment['name']}", "cron": deployment["schedules"][0]["schedule"],
                "manual_run": {k: manual[0][k] for k in ("name", "state_type", "total_run_time")},
                "cron_run": {k: cron_run[k] for k in ("name", "state_type", "auto_scheduled", "total_run_time")},
                "scheduled_runs": len(scheduled), "next_scheduled": min(r["expected_start_time"] for r in scheduled),
                "concurrent_pair": [{k: r[k] for k in ("name", "start_time", "end_time")} for r in (first, second)],
                "pair_state_names": history,
                "counts": record["counts"], "seconds": {k: round(v, 1) for k, v in timings.items()}}
    (Path(os.environ.get("DEDE_EVIDENCE_DIR", tmp)) / "prefect-server-evidence.json").write_text(
        json.dumps(evidence, indent=2))
    print(json.dumps(evidence, indent=2))
