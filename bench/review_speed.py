"""How fast the review app answers over a corpus of 100,000 scored samples (issue #21's target: under 2 s each).

`python -m bench.review_speed [--samples N] [--out docs/results/review.md]`

The run is synthetic: N 32x32 PNGs (64 distinct images under distinct keys) in shards of 10,000, written by
webdataset's TarWriter; scores in the scores table's schema (seeded random, 1% of the samples above the threshold,
spread over every shard, so a group's images come from every shard), each shard's sample spans recorded beside it
as `dede shard` records them (`--no-spans`: without, so images are found by reading the tars); cleaned by the shipped clean stage with
--no-copy (rejected.parquet, summary.json). The app runs in uvicorn on a loopback port and is timed over HTTP with
its token, as the page calls it:
  query         POST /api/query, an aggregate over every row (no images)
  query+grid    POST /api/query, the 100 highest scores with their thumbnails (read from the shards)
  group (cold)  GET /api/group?id=...&limit=200: a flagged group of 200+ samples, thumbnails read from the shards
  group (warm)  the same again (thumbnails cached by the app)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from dede_core.io.tarspans import index_tar
from dede_core.review.app import server
from dede_core.stages.clean import clean
from dede_core.stages.select import Rule
from schemas.manifest import ShardSpans, write_spans
from schemas.tables import CALIBRATION, SCORES, with_metadata

PER_SHARD = 10_000
NOTE = ("Images are read by seeking each sample's recorded byte span (`NNNNNN.spans.json`, written by `dede shard`). "
        "Shards without spans files are scanned member by member: before the spans were used, the same run took "
        "27.3 s for the cold group and 32.7 s for query+grid on this machine (`--no-spans` measures that path).")
THRESHOLD = 990.0


def _pngs(n: int = 64) -> list[bytes]:
    out = []
    for seed in range(n):
        pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_run(root: str, samples: int, seed: int = 0, spans: bool = True) -> str:
    """RUN/{shards,scores,clean} of `samples` synthetic scored samples; returns RUN. spans: record each shard's
    sample spans beside it, as `dede shard` does (without them, images are found by reading the tar)."""
    import hashlib

    run = os.path.join(root, "run")
    shards_dir, scores_dir = os.path.join(run, "shards"), os.path.join(run, "scores")
    os.makedirs(shards_dir)
    os.makedirs(scores_dir)
    rng = np.random.default_rng(seed)
    images, entries = _pngs(), []
    score = rng.uniform(0, 1000, samples)
    label = rng.integers(0, 5, samples)
    schema = with_metadata(SCORES, "scores", json.dumps({"bench": "review_speed"}))
    for s, start in enumerate(range(0, samples, PER_SHARD)):
        name, idx = f"{s:06d}.tar", range(start, min(start + PER_SHARD, samples))
        keys = [f"s{i:07d}" for i in idx]
        path = os.path.join(shards_dir, name)
        with wds.TarWriter(path, encoder=False) as w:
            for i, key in zip(idx, keys):
                w.write({"__key__": key, "png": images[i % len(images)], "cls": str(label[i]).encode()})
        data = open(path, "rb").read()
        entries.append({"name": name, "samples": len(keys), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "first_key": keys[0], "last_key": keys[-1]})
        if spans:  # as `dede shard` records them: each sample's byte span
            found = index_tar(path).samples
            offsets = [s.spans[0][0] for s in found] + [found[-1].spans[-1][1]]
            write_spans(shards_dir, ShardSpans(name, len(data), entries[-1]["sha256"], keys, offsets))
        n = len(keys)
        table = pa.table({
            "key": keys, "shard": [name] * n, "position": pa.array(range(n), pa.int32()), "source": keys,
            "label": pa.array(label[idx.start:idx.stop], pa.int32()), "width": pa.array([32] * n, pa.int32()),
            "height": pa.array([32] * n, pa.int32()), "status": ["ok"] * n, "error": pa.nulls(n, pa.string()),
            "score": score[idx.start:idx.stop], "recon_error": score[idx.start:idx.stop],
            "draws": pa.array([1] * n, pa.int16()), "knn_score": rng.uniform(0, 1, n),
            "density_score": rng.uniform(0, 1, n), "detector_hash": ["d" * 64] * n,
            "encoder_id": ["bench#0123456789abcdef"] * n}).cast(schema)
        pq.write_table(table, os.path.join(scores_dir, f"{s:06d}.parquet"))
    with open(os.path.join(shards_dir, "manifest.json"), "w") as f:
        json.dump({"format": "dede-shards/1", "source": "/synthetic", "samples_per_shard": PER_SHARD,
                   "created": "now", "shards": entries, "samples": samples, "classes": list("abcde")}, f)
    calibration = pa.table({"key": [f"aux{i}" for i in range(1000)], "score": rng.uniform(0, 990, 1000)})
    pq.write_table(calibration.cast(pa.schema([CALIBRATION.field("key"), CALIBRATION.field("score")])),
                   os.path.join(scores_dir, "calibration.parquet"))
    clean(shards_dir, scores_dir, os.path.join(run, "clean"), Rule.threshold(THRESHOLD), copy=False,
          progress=False)
    return run


def _timed(url: str, token: str, body: dict | None = None) -> tuple[float, dict]:
    request = urllib.request.Request(url, headers={"X-Dede-Token": token, "Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as r:
        payload = json.loads(r.read())
    return time.perf_counter() - start, payload


def measure(run: str) -> dict[str, float]:
    """Seconds of each timed request (see the module docstring)."""
    start = time.perf_counter()
    srv, url = server(run)
    opened = time.perf_counter() - start
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    base, token = url.split("/?token=")
    try:
        t = {"app start (reads the run)": opened}
        t["query"], _ = _timed(base + "/api/query", token, {"sql": "SELECT label, count(*) AS n, avg(score) AS mean "
                                                                   "FROM scores GROUP BY label ORDER BY label"})
        t["query+grid"], got = _timed(base + "/api/query", token, {
            "sql": "SELECT key, score FROM scores ORDER BY score DESC LIMIT 100"})
        assert sum(v is not None for v in got["thumbnails"].values()) == 100
        _, groups = _timed(base + "/api/groups", token)
        big = next(g for g in groups["groups"] if g["size"] >= 200)
        group_url = base + "/api/group?" + urllib.parse.urlencode({"id": big["id"], "limit": 200})
        t["group (cold)"], got = _timed(group_url, token)
        assert sum(m["thumbnail"] is not None for m in got["members"]) == 200
        t["group (warm)"], _ = _timed(group_url, token)
    finally:
        srv.should_exit = True
        thread.join(10)
    return t


def write_results(path: str, samples: int, seconds: dict[str, float], command: str) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    lines = ["# Review app speed", "", f"`{command}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, on "
             f"{cpu} ({os.cpu_count()} cores visible, shared with other jobs), Python {platform.python_version()}.",
             "", f"{samples:,} synthetic scored samples (32x32 PNGs, shards of {PER_SHARD:,}, 1% flagged across "
             "every shard), the app in uvicorn on a loopback port, timed over HTTP (bench/review_speed.py). "
             "Target: under 2 s for a query and for a group of 200 thumbnails.", "",
             "| request | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {value:.3f} |" for name, value in seconds.items()]
    lines += ["", NOTE]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.review_speed", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--out", default="docs/results/review.md")
    p.add_argument("--no-spans", action="store_true", help="shards without spans files (written before them)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dede-review-bench-") as root:
        start = time.perf_counter()
        run = build_run(root, args.samples, spans=not args.no_spans)
        print(f"built {args.samples} samples in {time.perf_counter() - start:.1f} s")
        seconds = measure(run)
    for name, value in seconds.items():
        print(f"{name:28s} {value:.3f} s")
    command = ("python -m bench.review_speed" + ("" if args.samples == 100_000 else f" --samples {args.samples}")
               + (" --no-spans" if args.no_spans else ""))
    write_results(args.out, args.samples, seconds, command)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
