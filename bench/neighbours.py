"""`dede bench neighbours`: the neighbours stage's wall time, peak memory and IVF recall as the corpus grows.

Synthetic victim embeddings, as the score stage writes them (SCORES/embeddings/<stem>.parquet, float16, 10,000
samples a shard): a Gaussian mixture of 1,000 components whose variance decays over the dimensions (as real
embeddings' does), plus a collapsed cluster of 0.05% (at least 2 a shard: a planted trigger). Each size runs in a fresh process
through the stage's own steps (plan, every job, finish), which reports its wall time per step and its peak RSS;
then the recall@k_max of the stage's neighbour lists against exact search over the full float16 unit vectors is
measured on a sample of queries. Writes docs/results/neighbours.md and .json.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import resource
import shutil
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow.parquet as pq

SHARD = 10_000  # samples per shard, dede shard's default


def write_corpus(root: str, n: int, dim: int, *, seed: int = 0) -> str:
    """A scores folder of n synthetic samples: run.json, _done markers, embeddings/<stem>.parquet."""
    from dede_core.neighbours.corpus import embeddings_table
    from schemas import names

    scores = os.path.join(root, "scores")
    os.makedirs(os.path.join(scores, names.DONE_DIR), exist_ok=True)
    os.makedirs(os.path.join(scores, names.EMBEDDINGS_DIR), exist_ok=True)
    with open(os.path.join(scores, names.SCORE_RUN), "w") as f:
        json.dump({"detector_hash": "synthetic", "shards": f"{n} synthetic"}, f)
    rng, planted = np.random.default_rng(seed), []
    decay = (1.0 / np.sqrt(np.arange(1, dim + 1))).astype(np.float32)
    centres = rng.normal(size=(1000, dim)).astype(np.float32) * decay
    trigger = rng.normal(size=dim).astype(np.float32) * decay
    for s, start in enumerate(range(0, n, SHARD)):
        m = min(SHARD, n - start)
        x = centres[rng.integers(0, len(centres), m)] + 0.7 * rng.standard_normal((m, dim), np.float32) * decay
        poison = np.zeros(m, bool)
        poison[rng.choice(m, min(m, max(2, round(0.0005 * m))), replace=False)] = True  # 0.05%, >= 2 a shard
        x[poison] = trigger + 0.002 * rng.standard_normal((int(poison.sum()), dim), np.float32)
        planted += (start + np.flatnonzero(poison)).tolist()
        thumbs = rng.integers(0, 256, (m, 256), dtype=np.uint8)
        table = embeddings_table([f"{s:06d}_{i:05d}" for i in range(m)], x, thumbs)
        pq.write_table(table, os.path.join(scores, names.EMBEDDINGS_DIR, f"{s:06d}.parquet"))
        with open(os.path.join(scores, names.DONE_DIR, f"{s:06d}.json"), "w") as f:
            json.dump({"shard": f"{s:06d}.tar", "sha256": f"synthetic-{s}"}, f)
    np.save(os.path.join(root, "planted.npy"), np.array(planted, np.int64))  # rows of the collapsed cluster
    return scores


def planted_groups(root: str, out: str) -> dict[str, Any]:
    """How the stage saw the planted cluster: its size, the groups its rows fell in, their sizes."""
    import pyarrow.dataset as ds

    rows = np.load(os.path.join(root, "planted.npy"))
    table = ds.dataset(out, format="parquet", exclude_invalid_files=True).to_table(
        columns=["row", "group_id", "group_size"], filter=ds.field("row").isin(rows.tolist()))
    return {"planted": len(rows), "groups": sorted(set(table.column("group_id").to_pylist()) - {None}),
            "group_sizes": sorted(set(table.column("group_size").to_pylist()) - {None})}


def run_stage(scores: str, out: str, settings: Any) -> dict[str, Any]:
    """The stage's steps in this process, timed; with this process' peak RSS."""
    from dede_core.stages.neighbours import NEIGHBOURS, NeighboursRun

    run = NeighboursRun(scores, out, settings, progress=True)
    t0 = time.perf_counter()
    plan = NEIGHBOURS.plan(run)
    t1 = time.perf_counter()
    markers = {NEIGHBOURS.job_name(j): NEIGHBOURS.run_job(j) for j in plan.jobs()}
    t2 = time.perf_counter()
    result = NEIGHBOURS.finish(plan, markers, {})
    t3 = time.perf_counter()
    return {"plan_s": t1 - t0, "jobs_s": t2 - t1, "finish_s": t3 - t2, "wall_s": t3 - t0, "jobs": len(markers),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "summary": result.summary}


def _unit(scores: str, stems: list[str]) -> np.ndarray:
    from dede_core.neighbours.corpus import chunks, read_corpus

    corpus = read_corpus(scores)
    return np.concatenate([c.vectors for stem in stems for c in chunks(corpus, stem, thumbs=False)])


def recall(scores: str, out: str, k: int, queries: int, *, seed: int = 1) -> float:
    """Recall@k of OUT's neighbour lists for `queries` random samples, against exact search over every sample's
    float32 unit vector (the embeddings files, one shard at a time)."""
    from dede_core.neighbours.corpus import read_corpus
    from dede_core.stages.neighbours import part_path

    corpus = read_corpus(scores)
    rows = np.sort(np.random.default_rng(seed).choice(corpus.rows, min(queries, corpus.rows), replace=False))
    found = np.concatenate([pq.read_table(part_path(out, s.stem)).column("ids").combine_chunks().values
                            .to_numpy().reshape(-1, k) for s in corpus.shards])[rows]
    best_s = np.full((len(rows), k), -np.inf, np.float32)
    best_i = np.zeros((len(rows), k), np.int64)
    q = None
    for shard in corpus.shards:
        x = _unit(scores, [shard.stem])
        if q is None:
            q = np.zeros((len(rows), x.shape[1]), np.float32)
        here = (rows >= shard.offset) & (rows < shard.offset + shard.rows)
        q[here] = x[rows[here] - shard.offset]
    for shard in corpus.shards:
        x = _unit(scores, [shard.stem])
        s = q @ x.T
        ids = np.arange(shard.offset, shard.offset + shard.rows)
        s[rows[:, None] == ids[None, :]] = -np.inf
        both_s, both_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, np.broadcast_to(ids, s.shape)], 1)
        top = np.argpartition(-both_s, k, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_i, top, 1)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, best_i)]))


def bench_size(work: str, n: int, dim: int, settings: Any, queries: int) -> dict[str, Any]:
    """One size: corpus written by one process, the stage run by another (its own peak RSS), recall measured."""
    root = os.path.join(work, f"n{n}")
    ctx = mp.get_context("spawn")
    t = time.perf_counter()
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        scores = pool.submit(write_corpus, root, n, dim).result()
    made_s = time.perf_counter() - t
    out = os.path.join(root, "neighbours")
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        row = pool.submit(run_stage, scores, out, settings).result()
    t = time.perf_counter()
    row["recall"] = recall(scores, out, settings.k_max, queries)
    row["planted"] = planted_groups(root, out)
    row |= {"n": n, "dim": dim, "write_corpus_s": made_s, "recall_s": time.perf_counter() - t,
            "out_mib": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs) / 2**20}
    shutil.rmtree(root, ignore_errors=True)
    return row


def run_bench(sizes: list[int], dim: int, settings: Any, work: str, *, queries: int = 2000) -> dict[str, Any]:
    """Every size in turn (smallest first); the report neighbours.md renders."""
    started, rows = time.perf_counter(), []
    for n in sizes:
        rows.append(bench_size(work, n, dim, settings, queries))
        r = rows[-1]
        print(f"N={n:,}: {r['wall_s']:.1f} s (plan {r['plan_s']:.1f}, jobs {r['jobs_s']:.1f}, finish "
              f"{r['finish_s']:.1f}), peak RSS {r['peak_rss_mib']:.0f} MiB, recall@{settings.k_max} {r['recall']:.3f}",
              flush=True)
    from bench.throughput_report import machine

    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "threads": os.environ.get("OMP_NUM_THREADS"), "settings": settings.identity(), "queries": queries,
            "rows": rows, "wall_s": time.perf_counter() - started}


def _index(spec: dict[str, Any]) -> str:
    if spec["kind"] == "exact":
        return "exact (IndexFlatIP)"
    return (f"IVF{spec['nlist']},{spec['codes']} on {spec['search_dim']} dims, nprobe {spec['nprobe']}, "
            f"re-rank {spec['refine']}x")


def write_report(report: dict[str, Any], out_dir: str, command: str) -> tuple[str, str]:
    """docs/results/neighbours.md and .json."""
    os.makedirs(out_dir, exist_ok=True)
    m, rows = report["machine"], report["rows"]
    lines = ["# Neighbours stage: time, memory and recall as the corpus grows", "",
             f"Command `{command}`, {report['date']}; machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB "
             f"(shared: load average {', '.join(str(v) for v in m['load_average'])} at the end); OMP_NUM_THREADS="
             f"{report['threads']}. Synthetic float16 embeddings of D={rows[0]['dim'] if rows else '?'} (a 1,000-"
             f"component Gaussian mixture whose variance decays over the dimensions, 0.05% collapsed onto one "
             f"point), 10,000 a shard, run through the stage's own steps in a fresh process each (bench/"
             f"neighbours.py). Recall@{max(report['settings']['ks'])}: of {report['queries']:,} random samples' "
             f"exact {max(report['settings']['ks'])} nearest (brute force over the float32 unit vectors), the "
             f"share in the stage's lists.", "",
             "| N | index | plan (index) s | jobs s | finish s | total s | s per 1k samples | peak RSS MiB | "
             "recall | planted cluster: samples, its group's size | OUT MiB |", "| " + " | ".join(["---"] * 11) + " |"]
    for r in rows:
        s = r["summary"]
        p = r["planted"]
        planted = f"{p['planted']} in {len(p['groups'])} group(s) of {', '.join(map(str, p['group_sizes']))}"
        lines.append(f"| {r['n']:,} | {_index(s['index'])} | {r['plan_s']:.1f} | {r['jobs_s']:.1f} | "
                     f"{r['finish_s']:.1f} | {r['wall_s']:.1f} | {1000 * r['wall_s'] / r['n']:.2f} | "
                     f"{r['peak_rss_mib']:,.0f} | {r['recall']:.3f} | {planted} | {r['out_mib']:,.0f} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        growth = np.log(b["wall_s"] / a["wall_s"]) / np.log(b["n"] / a["n"])
        lines += ["", f"Growth: total time ~ N^{growth:.2f} from {a['n']:,} to {b['n']:,} (the index kind changes at "
                  f"exact_limit={report['settings']['exact_limit']:,})."]
    md, js = os.path.join(out_dir, "neighbours.md"), os.path.join(out_dir, "neighbours.json")
    notes = ""
    if os.path.isfile(md):  # the hand-written Notes of an earlier report stay
        old = open(md).read()
        notes = old[old.index("## Notes"):] if "## Notes" in old else ""
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n" + (f"\n{notes}" if notes else ""))
    with open(js, "w") as f:
        json.dump(report | {"command": command}, f, indent=2, default=str)
    return md, js
