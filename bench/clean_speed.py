"""Clean against a plain copy on a corpus of real size (issue #15, item 1), all in one run.

The corpus: 224x224 RGB JPEGs (Fashion-MNIST upscaled, tinted per channel, with pixel noise so they compress
like photographs), `distinct` encoded images repeated under distinct keys until the corpus holds `gigabytes`,
sharded by the project's own shard stage (which records each sample's byte span). Scores are synthetic (a
seeded random score per sample in the scores table's schema): clean's work does not depend on their values, and
scoring a gigabyte of 224-px images on this machine's CPU would take hours. Measured, `copies` times each,
median counted:
  copy        shutil.copyfile of every shard (the kernel's copy, from the page cache, no fsync)
  copy+fsync  the same with an fsync per shard, as clean makes each shard durable before its marker
  sha256      one sha256 pass over every shard (what clean made twice before issue #22, and still makes on the
              source of a folder recorded with sha256)
  blake3      one BLAKE3 pass over every shard (clean makes two: the source against its manifest, the output)
  clean       dede_core.stages.clean.clean dropping the top `drop` by score, using the recorded spans
  parsed      the same clean on a copy of the shards folder without spans files (the tar parsed as before)
each with the CPU seconds this process spent on it (user + system, its threads included: on shared cores the
wall-clock rates move with the other jobs, the CPU time much less), and the fixed costs: clean of one 1-sample
shard (per run), and of `tiny_shards` 1-sample shards (per shard),
and where one clean's time goes: the same clean under cProfile, the cumulative seconds of its parts (the profiler
slows the Python-level parts more than the C-level copy, hashes and fsyncs).
"""

from __future__ import annotations

import cProfile
import hashlib
import io
import pstats
import os
import resource
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from bench.datasets import load_fashion_mnist
from dede_core.io import digests
from dede_core.stages.clean import clean
from dede_core.stages.select import Rule
from dede_core.stages.shard import write_shards
from schemas.manifest import read_manifest, read_spans
from schemas.tables import SCORES, with_metadata


@dataclass(frozen=True)
class CleanSpeedConfig:
    """One clean-at-scale setting; saved with its numbers."""

    gigabytes: float = 1.0  # corpus size in 1e9 bytes of shards
    image_size: int = 224
    samples_per_shard: int = 3000  # about 30 shards of 37 MB in a gigabyte of ~12 kB JPEGs
    distinct: int = 1000  # distinct encoded images, repeated under distinct keys
    noise: float = 4.0  # pixel noise (std, 0-255 scale) that makes the JPEGs photo-sized
    drop: float = 0.05  # clean drops the top 5% by score (--quantile 0.95)
    copies: int = 5
    tiny_shards: int = 20  # shards of one sample each, for the fixed cost per shard

    def __post_init__(self) -> None:
        if self.gigabytes <= 0 or not 0 < self.drop < 1:
            raise ValueError(f"gigabytes must be > 0 and drop in (0, 1); got {self.gigabytes}, {self.drop}")
        for name in ("samples_per_shard", "distinct", "copies", "tiny_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _jpegs(n: int, size: int, noise: float) -> list[bytes]:
    images, _ = load_fashion_mnist("train")
    x = torch.from_numpy(np.pad(images[:n], ((0, 0), (2, 2), (2, 2))))[:, None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    rng, out = np.random.default_rng(0), []
    for gray in x:
        rgb = np.stack([gray, 0.8 * gray + 20, 0.6 * gray + 40], -1) + rng.normal(0, noise, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_corpus(work: str, cfg: CleanSpeedConfig, pool: list[bytes], name: str = "shards",
                 samples: int | None = None, per_shard: int | None = None) -> str:
    """work/<name>: shards of cfg.gigabytes (or of `samples` samples) of the pool's JPEGs, via a Parquet source."""
    data, size = [], 0
    while (size < cfg.gigabytes * 1e9) if samples is None else (len(data) < samples):
        data.append(pool[len(data) % len(pool)])
        size += len(data[-1]) + 1536  # the tar headers of its three members and padding, about
    source = os.path.join(work, f"{name}.parquet")
    keys = [f"s{i:08d}" for i in range(len(data))]
    pq.write_table(pa.table({"key": keys, "image": pa.array(data, pa.binary()), "label": [i % 10 for i in
                                                                                          range(len(data))]}), source)
    del data
    shards = os.path.join(work, name)
    write_shards(source, shards, samples_per_shard=per_shard or cfg.samples_per_shard, key_column="key",
                 progress=False)
    os.unlink(source)
    return shards


def write_scores(shards: str, scores: str, seed: int = 0) -> None:
    """One scores file per shard in the SCORES schema, a seeded uniform score per sample (keys from the spans)."""
    os.makedirs(scores, exist_ok=True)
    rng, schema = np.random.default_rng(seed), with_metadata(SCORES, "scores", "{}")
    for entry in read_manifest(shards).shards:
        keys = read_spans(shards, entry).keys
        n = len(keys)
        given = {"key": keys, "shard": [entry.name] * n, "position": np.arange(n, dtype=np.int32),
                 "status": ["ok"] * n, "score": rng.uniform(0, 1, n), "recon_error": rng.uniform(0, 1, n),
                 "draws": np.ones(n, dtype=np.int16), "detector_hash": ["bench"] * n, "encoder_id": ["bench"] * n}
        table = pa.table({f.name: given.get(f.name, pa.nulls(n, f.type)) for f in schema})  # others: null
        pq.write_table(table.cast(schema), os.path.join(scores, entry.name[:-4] + ".parquet"))


def _tars(shards: str) -> list[str]:
    return [os.path.join(shards, e.name) for e in read_manifest(shards).shards]


def _copy(tars: list[str], target: str, fsync: bool) -> float:
    os.makedirs(target)
    start = time.perf_counter()
    for tar in tars:
        out = os.path.join(target, os.path.basename(tar))
        shutil.copyfile(tar, out)
        if fsync:
            fd = os.open(out, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - start


def _sha256(tars: list[str], target: str) -> float:
    """One sha256 pass over every shard: what clean does twice (the source against its manifest, the output)."""
    start = time.perf_counter()
    for tar in tars:
        with open(tar, "rb") as f:
            hashlib.file_digest(f, "sha256")
    return time.perf_counter() - start


def _blake3(tars: list[str], target: str) -> float:
    """One BLAKE3 pass over every shard: what clean does twice (the source against its manifest, the output)."""
    start, buffer = time.perf_counter(), memoryview(bytearray(8 << 20))
    for tar in tars:
        digest = digests.new("blake3")
        with open(tar, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                digest.update(buffer[:n])
        digest.hexdigest()
    return time.perf_counter() - start


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _clean(shards: str, scores: str, out: str, drop: float) -> float:
    start = time.perf_counter()
    clean(shards, scores, out, Rule.quantile(1 - drop), progress=False)
    return time.perf_counter() - start


# Where clean's time goes: (label, module path suffix, function name) of the parts, timed cumulatively.
PARTS = (("copy the kept runs, hash source and output (copy_runs)", "io/tarspans.py", "copy_runs"),
         ("fsync (shards, rejected rows, markers, final files)", "~", "<built-in method posix.fsync>"),
         ("select the samples to drop (DuckDB)", "stages/select.py", "select"),
         ("the shard's samples from its spans file", "io/tarspans.py", "recorded_index"),
         ("each shard's scored keys (its scores file)", "stages/clean_shard.py", "_scored_keys"),
         ("the rejected rows' Parquet files", "io/storage.py", "write_parquet"),
         ("clean in all (profiled)", "bench/clean_speed.py", "_clean"))


def where_time_goes(shards: str, scores: str, out: str, drop: float) -> dict[str, float]:
    """One clean under cProfile: label -> cumulative seconds of each of PARTS."""
    profile = cProfile.Profile()
    profile.runcall(_clean, shards, scores, out, drop)
    stats = pstats.Stats(profile).stats  # (file, line, function) -> (calls, primitive, own s, cumulative s, callers)
    return {label: sum(v[3] for (file, _, function), v in stats.items() if file.endswith(suffix) and function == name)
            for label, suffix, name in PARTS}


def measure(cfg: CleanSpeedConfig, work: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement of one setting, in work (a scratch folder, emptied of its outputs as it goes)."""
    started = time.perf_counter()
    pool = _jpegs(cfg.distinct, cfg.image_size, cfg.noise)
    shards, scores = write_corpus(work, cfg, pool), os.path.join(work, "scores")
    write_scores(shards, scores)
    parsed = os.path.join(work, "shards-without-spans")
    shutil.copytree(shards, parsed, ignore=shutil.ignore_patterns("*.spans.json"))
    tars = _tars(shards)
    total, samples = sum(os.path.getsize(t) for t in tars), read_manifest(shards).samples
    log(f"corpus: {total / 1e9:.2f} GB, {samples} samples ({total / samples / 1e3:.1f} kB each) in {len(tars)} shards "
        f"({time.perf_counter() - started:.0f} s to make)")
    times: dict[str, list[float]] = {"copy": [], "copy_fsync": [], "sha256": [], "blake3": [], "clean": [],
                                     "clean_parsed": []}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    for i in range(cfg.copies):
        for name, run in (("copy", lambda out: _copy(tars, out, False)),
                          ("copy_fsync", lambda out: _copy(tars, out, True)),
                          ("sha256", lambda out: _sha256(tars, out)),
                          ("blake3", lambda out: _blake3(tars, out)),
                          ("clean", lambda out: _clean(shards, scores, out, cfg.drop)),
                          ("clean_parsed", lambda out: _clean(parsed, scores, out, cfg.drop))):
            out = os.path.join(work, f"{name}-{i}")
            os.sync()  # the previous run's dirty pages are written back now, not during this one
            used = _cpu_seconds()
            times[name].append(run(out))
            cpu[name].append(_cpu_seconds() - used)
            shutil.rmtree(out, ignore_errors=True)  # one output at a time on disk
        log(f"round {i + 1}: " + ", ".join(f"{k} {total / 1e6 / v[-1]:,.0f} MB/s" for k, v in times.items()))
    fixed = _fixed_costs(cfg, work, pool)
    os.sync()
    parts = where_time_goes(shards, scores, os.path.join(work, "profiled"), cfg.drop)
    shutil.rmtree(os.path.join(work, "profiled"), ignore_errors=True)
    median = {name: statistics.median(v) for name, v in times.items()}
    rates = {f"{name}_mb_per_s": total / 1e6 / seconds for name, seconds in median.items()}
    return {"kind": "clean-scale", "config": asdict(cfg), "bytes": total, "samples": samples, "shards": len(tars),
            "seconds": times, "median_seconds": median, "cpu_seconds": cpu,
            "median_cpu_seconds": {name: statistics.median(v) for name, v in cpu.items()},
            **rates, **fixed, "parts_s": parts,
            "round_ratios": {"clean_vs_copy": [c / p for c, p in zip(times["copy"], times["clean"])],
                             "clean_vs_copy_fsync": [c / p for c, p in zip(times["copy_fsync"], times["clean"])]},
            "ratios": {"clean_vs_copy": rates["clean_mb_per_s"] / rates["copy_mb_per_s"],
                       "clean_vs_copy_fsync": rates["clean_mb_per_s"] / rates["copy_fsync_mb_per_s"],
                       "clean_vs_clean_parsed": rates["clean_mb_per_s"] / rates["clean_parsed_mb_per_s"]},
            "wall_s": time.perf_counter() - started,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _fixed_costs(cfg: CleanSpeedConfig, work: str, pool: list[bytes]) -> dict[str, float]:
    """Clean of one 1-sample shard (the per-run cost plus one shard's) and of tiny_shards 1-sample shards: the
    difference over tiny_shards - 1 is the fixed cost per shard; medians of `copies` runs each."""
    runs = {}
    for n in (1, cfg.tiny_shards):
        shards = write_corpus(work, cfg, pool, f"tiny-{n}", samples=n, per_shard=1)
        scores = os.path.join(work, f"tiny-{n}-scores")
        write_scores(shards, scores)
        seconds = []
        for i in range(cfg.copies):
            seconds.append(_clean(shards, scores, os.path.join(work, f"tiny-{n}-clean-{i}"), cfg.drop))
        runs[n] = statistics.median(seconds)
    per_shard = (runs[cfg.tiny_shards] - runs[1]) / max(cfg.tiny_shards - 1, 1)
    return {"fixed_s_per_shard": per_shard, "fixed_s_per_run": runs[1] - per_shard,
            "tiny_clean_seconds": {str(n): seconds for n, seconds in runs.items()}}


def main(argv: list[str] | None = None) -> int:
    """python -m bench.clean_speed [--gigabytes G] --work DIR --out DIR: measure, then add the rows to
    OUT/throughput.md and OUT/throughput.json. The corpus lives in a temporary folder under DIR, deleted after."""
    import argparse
    import tempfile

    from bench.throughput_report import machine, write_report

    parser = argparse.ArgumentParser(prog="python -m bench.clean_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--gigabytes", type=float, default=CleanSpeedConfig.gigabytes)
    parser.add_argument("--samples-per-shard", type=int, default=CleanSpeedConfig.samples_per_shard)
    parser.add_argument("--copies", type=int, default=CleanSpeedConfig.copies)
    parser.add_argument("--work", default=None, help="scratch parent folder (default: the system's temp folder)")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    cfg = CleanSpeedConfig(gigabytes=args.gigabytes, samples_per_shard=args.samples_per_shard, copies=args.copies)
    with tempfile.TemporaryDirectory(prefix="dede-clean-speed-", dir=args.work) as work:
        report = measure(cfg, work)
    report |= {"machine": machine(), "command": "python -m bench.clean_speed " + " ".join(argv or [])}
    md, js = write_report(f"clean-{cfg.gigabytes:g}gb-{cfg.image_size}px", report, args.out)
    print(f"clean / copy {report['ratios']['clean_vs_copy']:.3f}; wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
