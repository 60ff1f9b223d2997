"""Neighbours stage: a scores folder's embeddings -> OUT/<stem>.parquet, each sample's corpus-level neighbourhood.

The evidence DeDe's reconstruction error can miss is in the corpus' own embedding geometry: triggered samples'
victim embeddings collapse onto one point, so they are each other's nearest neighbours. The stage's protocol
(dede_core.stages.protocol: NEIGHBOURS):

    plan     claim OUT (the scores folder's run.json minus its shard list, plus these settings; other settings
             are refused), read SCORES/embeddings/ in chunks and build one index over the corpus
             (OUT/index.faiss, OUT/thumbs.npy, OUT/index.json last; dede_core.neighbours.build), fix the jobs:
             groups of shards of about rows_per_job samples
    run_job  query its shards' embeddings for their k_max nearest other samples: OUT/_parts/<stem>.parquet
             (row ids, cosine distances, near-duplicate flags), marker _done/<stem>.json last
    finish   the statistics over the whole corpus' lists (dede_core.neighbours.geometry): OUT/<stem>.parquet
             per shard (schemas.tables.NEIGHBOURS), then OUT/summary.json last

Rerun: an unchanged scores folder finds summary.json of the same corpus and recomputes nothing; a run killed
midway keeps its index and finished parts. A grown (or rescored) corpus has another corpus id: the embeddings are
never recomputed (they are the scores folder's), but the index and EVERY sample's neighbourhood are, since a new
sample can be anyone's neighbour.
Memory: the plan holds the index (IndexSpec.index_bytes) and, for IVF, a float16 training sample; a job the index
and its shards' vectors; finish N x k_max ids, distances and flags (13 bytes each: 260 MB for 1M samples at
k_max 20) plus about 100 bytes of columns per sample. The plan refuses a corpus whose index or finish exceed
memory_mib.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from dede_core.io import storage
from dede_core.neighbours import index as ix
from dede_core.neighbours.build import build_index, load_array, load_index
from dede_core.neighbours.corpus import Corpus, chunks, read_corpus
from dede_core.neighbours.geometry import thumb_correlations, thumb_distances
from dede_core.neighbours.summarize import FINISH_BYTES_PER_NEIGHBOUR, finish_corpus
from dede_core.stages import folder
from dede_core.stages.protocol import Placement, run_in_order
from schemas import names
from schemas.manifest import differences
from schemas.tables import neighbour_parts_schema

log = logging.getLogger("dede")


@dataclass(frozen=True)
class NeighboursSettings:
    """How a corpus' neighbourhoods are computed, apart from which folders: the neighbours stage's settings."""

    ks: tuple[int, ...] = (3, 5, 10, 20)  # a kdist_<k> column each; the largest, k_max, is the list's length
    exact_limit: int = 50_000  # up to this many embeddings exact search (IndexFlatIP); beyond, an IVF index
    pca_dim: int | None = 128  # IVF: search in the top pca_dim directions of a sample (None: in all D)
    nlist: int | None = None  # IVF lists; None: 4 sqrt(N) (index.choose)
    nprobe: int | None = None  # IVF lists searched per query; None: at least 32, and 4096 vectors scanned
    refine: int = 4  # IVF: refine x (k_max + 1) candidates re-ranked by their exact cosine (<= 1: index order)
    memory_mib: int = 4096  # budget of the plan's index and finish's arrays; a corpus beyond it is refused
    rows_per_job: int = 200_000  # a job queries whole shards, about this many samples (no effect on results)
    dup_threshold: float = 0.95  # thumbnail Pearson correlation from which a neighbour is a near-duplicate
    lof_k: int = 10  # k of slof, dao and the group threshold tau (a kdist_<k> of ks)
    distinct_k: int = 5  # kdist_distinct: the distinct_k-th neighbour that is no near-duplicate
    seed: int = 0  # the IVF training sample and k-means
    device: str = "cpu"  # cpu, cuda or cuda:N: a GPU index when faiss has GPU support

    def __post_init__(self) -> None:
        ks = self.ks
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 2 for k in ks) or list(ks) != sorted(
                set(ks)):
            raise ValueError(f"ks must be increasing ints >= 2, got {ks!r}")
        if self.lof_k not in ks:
            raise ValueError(f"lof_k={self.lof_k} must be one of ks {ks}")
        if not 1 <= self.distinct_k <= max(ks):
            raise ValueError(f"distinct_k must be in 1..{max(ks)}, got {self.distinct_k}")
        if not -1.0 <= self.dup_threshold <= 1.0:
            raise ValueError(f"dup_threshold is a correlation in [-1, 1], got {self.dup_threshold}")
        for name in ("exact_limit", "memory_mib", "rows_per_job"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def k_max(self) -> int:
        return max(self.ks)

    def identity(self) -> dict[str, Any]:
        """What the outputs depend on: every field but rows_per_job; of the device only its type."""
        d = dataclasses.asdict(self) | {"ks": list(self.ks), "device": self.device.split(":")[0]}
        d.pop("rows_per_job")
        return d


@dataclass(frozen=True)
class NeighboursRun:
    """One run of the neighbours stage (what NEIGHBOURS.plan takes)."""

    scores: str  # scores folder written by dede score, with its embeddings/ folder
    out: str  # neighbours folder
    settings: NeighboursSettings = field(default_factory=NeighboursSettings)
    progress: bool = True  # progress lines on the dede logger


@dataclass(frozen=True)
class NeighboursJob:
    """One group of shards to query: small and picklable."""

    run: NeighboursRun
    corpus: Corpus
    spec: ix.IndexSpec
    stems: list[str]


@dataclass(frozen=True)
class NeighboursPlan:
    """The corpus, its index and the shards still to query."""

    run: NeighboursRun
    corpus: Corpus
    spec: ix.IndexSpec
    groups: list[list[str]]  # pending shard stems, one list per job
    built: bool  # this plan (re)built the index
    started: float  # time.time() when planning began

    def jobs(self) -> list[NeighboursJob]:
        return [NeighboursJob(self.run, self.corpus, self.spec, stems) for stems in self.groups]


def _label(stems: list[str]) -> str:
    return stems[0] if len(stems) == 1 else f"{stems[0]}..{stems[-1]}"


def _identity(corpus: Corpus, settings: NeighboursSettings) -> dict[str, Any]:
    scores = storage.read_json(storage.join(corpus.scores, names.SCORE_RUN))
    scores.pop("shards", None)
    scores.pop("dede_version", None)
    return {"scores": scores, "settings": settings.identity()}


def _claim(run: NeighboursRun, corpus: Corpus) -> None:
    record = _identity(corpus, run.settings)

    def check(old: dict[str, Any]) -> bool:
        folder.refuse(run.out, "neighbourhoods", differences(old, record))
        return False

    folder.claim(run.out, names.NEIGHBOURS_CONFIG, record, check=check)


def _summary(out: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(storage.join(out, names.SUMMARY))
    except (OSError, ValueError):
        return None


def plan_neighbours(run: NeighboursRun) -> NeighboursPlan:
    """Claim OUT, (re)build the index unless OUT/index.json is of this corpus, group the shards left."""
    started, s = time.time(), run.settings
    corpus = read_corpus(run.scores)
    _claim(run, corpus)
    markers = folder.Markers(run.out)
    markers.sweep()
    storage.sweep_temporaries(storage.join(run.out, names.PARTS_DIR))  # a killed job's half-written part
    storage.makedirs(storage.join(run.out, names.PARTS_DIR))
    spec = ix.choose(corpus.rows, corpus.dim, exact_limit=s.exact_limit, pca_dim=s.pca_dim, nlist=s.nlist,
                     nprobe=s.nprobe, memory_mib=s.memory_mib, refine=s.refine)
    finish_bytes = corpus.rows * s.k_max * FINISH_BYTES_PER_NEIGHBOUR
    if finish_bytes > s.memory_mib * ix.MIB:
        raise ValueError(f"finish holds {corpus.rows} x {s.k_max} neighbours ({finish_bytes // ix.MIB} MiB), over "
                         f"memory_mib={s.memory_mib}: raise it or lower ks")
    summary = _summary(run.out)
    if summary and summary.get("corpus_id") == corpus.id:
        return NeighboursPlan(run, corpus, spec, [], False, started)  # finished: nothing to recompute
    if summary:  # of another corpus: the folder is not complete until finish writes this corpus' summary
        storage.unlink(storage.join(run.out, names.SUMMARY))
    info_path = storage.join(run.out, names.INDEX_INFO)
    info = storage.read_json(info_path) if storage.isfile(info_path) else {}
    built = info.get("corpus_id") != corpus.id or not storage.isfile(storage.join(run.out, names.INDEX))
    if built:
        log.info(f"neighbours: {corpus.rows} samples in {len(corpus.shards)} shards (D={corpus.dim}); building a "
                 f"{spec.kind} index{'' if spec.kind == 'exact' else f' ({spec.codes}, {spec.nlist} lists)'}")
        build_index(corpus, run.out, spec, seed=s.seed, progress=run.progress)
    pending = [sh for sh in corpus.shards if built or (markers.done(sh.stem) or {}).get("corpus_id") != corpus.id]
    groups, rows = [], 0
    for sh in pending:
        if not groups or rows + sh.rows > s.rows_per_job:
            groups.append([])
            rows = 0
        groups[-1].append(sh.stem)
        rows += sh.rows
    return NeighboursPlan(run, corpus, spec, groups, built, started)


def part_path(out: str, stem: str) -> str:
    return storage.join(out, names.PARTS_DIR, f"{stem}.parquet")


def neighbours_job(job: NeighboursJob) -> dict[str, Any]:
    """Query each shard's embeddings for their k_max nearest other samples; OUT/_parts/<stem>.parquet, marker last."""
    started, run, k = time.perf_counter(), job.run, job.run.settings.k_max
    index = load_index(run.out, job.corpus.id, job.spec, run.settings.device)
    thumbs = load_array(run.out, names.THUMBS)
    markers, schema, rows = folder.Markers(run.out), neighbour_parts_schema(k), 0
    for stem in job.stems:
        t = time.perf_counter()
        cols = {"row": [], "ids": [], "dist": [], "dup": [], "pix": [], "valid": []}
        for chunk in chunks(job.corpus, stem, batch=4096):  # (4096, k_max, 256) thumbnails at a time
            n = len(chunk.rows)
            ids, dist = np.full((n, k), -1, np.int64), np.full((n, k), np.nan, np.float32)
            if chunk.valid.any():
                ids[chunk.valid], dist[chunk.valid] = ix.search(index, chunk.vectors[chunk.valid],
                                                                chunk.rows[chunk.valid], k)
            theirs = np.asarray(thumbs[np.maximum(ids, 0).ravel()]).reshape(n, k, -1)
            dup = (thumb_correlations(chunk.thumbs, theirs) >= run.settings.dup_threshold) & (ids >= 0)
            pix = thumb_distances(chunk.thumbs, theirs)
            for name, value in (("row", chunk.rows), ("ids", ids), ("dist", dist), ("dup", dup), ("pix", pix),
                                ("valid", chunk.valid)):
                cols[name].append(value)
        valid = pa.array(~np.concatenate(cols["valid"]))  # the mask of null lists
        arrays = [pa.array(np.concatenate(cols["row"]))]
        for name, kind in (("ids", pa.int64()), ("dist", pa.float32()), ("dup", pa.bool_()), ("pix", pa.float32())):
            flat = pa.array(np.concatenate(cols[name]).ravel(), kind)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, k, mask=valid))
        storage.write_parquet(part_path(run.out, stem), pa.Table.from_arrays(arrays, schema=schema))
        n = len(arrays[0])
        rows += n
        markers.mark_done(stem, {"shard": stem, "rows": n, "corpus_id": job.corpus.id,
                                 "elapsed_s": round(time.perf_counter() - t, 3)})
    return {"stems": job.stems, "rows": rows, "elapsed_s": round(time.perf_counter() - started, 3)}


@dataclass(frozen=True)
class NeighboursResult:
    """What one call did, and where."""

    out: str  # the neighbours folder
    recomputed: bool  # False: the folder was complete for this corpus, nothing was done
    summary: dict[str, Any]  # OUT/summary.json


def finish_neighbours(plan: NeighboursPlan, markers: Mapping[str, dict[str, Any]],
                      errors: Mapping[str, BaseException]) -> NeighboursResult:
    """Raise a failed job's error; else the corpus statistics into OUT/<stem>.parquet and OUT/summary.json."""
    if errors:
        label, exc = next(iter(errors.items()))
        raise RuntimeError(f"neighbours job {label} failed ({type(exc).__name__}: {exc}); rerun to resume") from exc
    run = plan.run
    summary = _summary(run.out)
    if not plan.groups and summary and summary.get("corpus_id") == plan.corpus.id:
        return NeighboursResult(run.out, False, summary)
    info = storage.read_json(storage.join(run.out, names.INDEX_INFO))
    summary = finish_corpus(plan.corpus, run.out, run.settings, info, config=_identity(plan.corpus, run.settings),
                            started=plan.started, part_path=part_path)
    return NeighboursResult(run.out, True, summary)


class NeighboursStage:
    """The neighbours stage's four steps (dede_core.stages.protocol); a job is a group of shards."""

    name, unit = "neighbours", "shard groups"

    def plan(self, run: NeighboursRun) -> NeighboursPlan:
        return plan_neighbours(run)

    def job_name(self, job: NeighboursJob) -> str:
        return _label(job.stems)

    def place(self, job: NeighboursJob, where: Placement) -> NeighboursJob:
        """On a worker pinned to one GPU that GPU is cuda (cuda:0)."""
        s = job.run.settings
        if where.pinned_gpu and s.device.startswith("cuda"):
            run = dataclasses.replace(job.run, settings=dataclasses.replace(s, device="cuda"))
            return dataclasses.replace(job, run=run)
        return job

    def run_job(self, job: NeighboursJob) -> dict[str, Any]:
        return neighbours_job(job)

    def finish(self, plan: NeighboursPlan, markers: Mapping[str, dict[str, Any]],
               errors: Mapping[str, BaseException]) -> NeighboursResult:
        return finish_neighbours(plan, markers, errors)


NEIGHBOURS = NeighboursStage()


def neighbours(scores_dir: str | os.PathLike, out_dir: str | os.PathLike,
               settings: NeighboursSettings = NeighboursSettings(), progress: bool = True) -> NeighboursResult:
    """Every sample's corpus-level neighbourhood, from SCORES/embeddings/ into OUT: the stage's steps in this
    process. Rerunning on an unchanged scores folder does nothing; on a grown one it rebuilds the index and
    recomputes every sample's neighbourhood (never the embeddings); other settings into OUT are refused."""
    run = NeighboursRun(storage.absolute(scores_dir), storage.absolute(out_dir), settings, progress=progress)
    return run_in_order(NEIGHBOURS, run, progress=progress)
