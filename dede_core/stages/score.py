"""Score stage: a shards folder -> OUT/<shard>.parquet per shard, OUT/calibration.parquet and OUT/run.json.

The shard is the unit of work: its Parquet file appears (temporary name + rename) only once every sample of it
is scored, then `_done/<shard>.json` is written last; rerunning skips shards with both. A job (the stage's
protocol, dede_core.stages.protocol: SCORE) is a group of shards; within it batches span shards: one DataLoader
runs over the group and results are routed back to their shard by position (score_batches.py).
OUT/run.json pins the detector, encoder and score settings, so one folder never mixes scores of two setups.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dede_core.io import storage
from dede_core.detector.cache import forget_detector
from dede_core.detector.health import describe_health
from dede_core.detector.scorer import ScoreConfig
from dede_core.io.loader import decode_workers
from dede_core.stages import folder
from dede_core.stages.protocol import Placement, run_in_order
from dede_core.stages.score_batches import JobProgress, SourceRefs, open_parts, score_parts, windows
from dede_core.stages.scoring import open_writer
from schemas.manifest import ShardEntry, read_manifest
from schemas import names
from schemas.tables import STATUS_DECODE_ERROR, STATUS_OK, STATUS_READ_ERROR

log = logging.getLogger("dede")

@dataclass(frozen=True)
class ScoreStageResult:
    """What one call did."""

    scored: list[str]  # shards scored and written by this call
    skipped: list[str]  # shards already complete (marker and Parquet present): not touched
    failed: dict[str, str]  # unreadable shard -> why; also OUT/_failed/<stem>.json, retried on rerun
    samples: int  # rows written by this call
    ok: int  # of which scored
    decode_errors: int
    read_errors: int
    elapsed_s: float
    images_per_s: float


@dataclass(frozen=True)
class ScoreSettings:
    """How a shards folder is scored, apart from which folders: the score stage's settings."""

    score: ScoreConfig = field(default_factory=ScoreConfig)  # how each score is computed (saved in OUT/run.json)
    knn_k: int = 10  # neighbours of the k-NN score
    with_embedding: bool = False  # keep each sample's victim embedding in its row
    batch_size: int = 256  # images per forward pass
    workers: int | None = None  # decoding processes per job; None: the cores the model leaves (loader.decode_workers)
    device: str = "cpu"  # cpu, cuda or cuda:N
    encoder: str | None = None  # the victim's spec, when the detector's own must not be trusted to run code
    group_size: int | None = 1  # shards per job; None: every pending shard in one job

    def __post_init__(self) -> None:
        size = self.group_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"group_size must be an int >= 1 (or None: one job), got {size!r}")


@dataclass(frozen=True)
class ScoreRun:
    """One run of the score stage: its folders and settings (what SCORE.plan takes)."""

    shards: str  # shards folder written by the shard stage (path or fsspec URL)
    detector: str  # detector checkpoint
    out: str  # scores folder
    settings: ScoreSettings = field(default_factory=ScoreSettings)
    only: list[str] | None = None  # score these shards only (names or stems); None: every shard
    progress: bool = True  # progress lines on the dede logger


@dataclass(frozen=True)
class ScoreJob:
    """One group of shards to score: small and picklable, it travels to the process that scores it."""

    run: ScoreRun
    names: list[str]


def job_label(names: list[str]) -> str:
    """'000003' or '000004..000007': names a job by its shards."""
    stems = [folder.stem(name) for name in names]
    return stems[0] if len(stems) == 1 else f"{stems[0]}..{stems[-1]}"


@dataclass(frozen=True)
class ScorePlan:
    """A score run fixed before any shard is scored: OUT claimed, calibration written, the jobs left."""

    run: ScoreRun
    groups: list[list[str]]  # the pending shards, one list per job
    skipped: list[str]  # shards complete before this run
    started: float  # time.time() when planning began

    def jobs(self) -> list[ScoreJob]:
        return [ScoreJob(self.run, names) for names in self.groups]

    def group(self, label: str) -> list[str]:
        return next(names for names in self.groups if job_label(names) == label)


def _select(entries: list[ShardEntry], wanted: list[str] | None) -> list[ShardEntry]:
    if wanted is None:
        return list(entries)
    by_name = {e.name: e for e in entries} | {os.path.splitext(e.name)[0]: e for e in entries}
    unknown = [w for w in wanted if os.path.basename(w) not in by_name]
    if unknown:
        raise ValueError(f"shards {unknown[:5]} are not in the manifest (it lists {entries[0].name} .. "
                         f"{entries[-1].name})" if entries else f"shards {unknown[:5]}: the manifest lists none")
    picked = {by_name[os.path.basename(w)].name for w in wanted}
    return [e for e in entries if e.name in picked]


def _is_done(out_dir: str, markers: folder.Markers, entry: ShardEntry) -> bool:
    return (markers.done(entry.name) is not None
            and storage.isfile(storage.join(out_dir, f"{folder.stem(entry.name)}.parquet")))


def plan_score(run: ScoreRun) -> ScorePlan:
    """Claim OUT (OUT/run.json; other settings are refused), write OUT/calibration.parquet, and group the
    shards still to score into jobs. A run of every shard (only None or []) also sweeps a killed run's
    temporaries and writes OUT/skipped.parquet: never while another run's jobs write into OUT."""
    started = time.time()
    manifest = read_manifest(run.shards)
    entries = _select(manifest.shards, run.only)
    writer = open_writer(run, manifest)
    whole = not run.only
    if whole:
        log.info(describe_health(writer.ckpt.meta.get("health")))
    if not storage.isfile(storage.join(run.out, names.CALIBRATION)):
        writer.write_calibration(run.settings.batch_size)
    if whole:
        writer.markers.sweep()
        writer.write_skipped(list(manifest.skipped))
    skipped = [e.name for e in entries if _is_done(run.out, writer.markers, e)]
    pending = [e.name for e in entries if e.name not in skipped]
    size = run.settings.group_size or max(1, len(pending))
    return ScorePlan(run=run, groups=[pending[i:i + size] for i in range(0, len(pending), size)],
                     skipped=skipped, started=started)


def score_job(job: ScoreJob) -> dict[str, Any]:
    """Score one group of shards into OUT/<stem>.parquet, each shard's marker last; an unreadable shard is
    recorded in OUT/_failed/ and the others go on. Returns the job's counts (ScoreStageResult as a dict)."""
    started, run = time.perf_counter(), job.run
    manifest = read_manifest(run.shards)
    entries = _select(manifest.shards, job.names)
    writer = open_writer(run, manifest)
    skipped = [e.name for e in entries if _is_done(run.out, writer.markers, e)]  # done since the plan
    todo = [e for e in entries if e.name not in skipped]
    workers = decode_workers(run.settings.device) if run.settings.workers is None else run.settings.workers
    progress = JobProgress(todo, quiet=not run.progress)
    scored, failed, counts, refs = [], {}, Counter(), SourceRefs(run.shards)
    for window in windows(todo):
        scratch = storage.scratch(run.shards)  # the window's shards downloaded, when SHARDS is a URL
        try:
            parts, broken = open_parts(run.shards, writer.markers, window, scratch.name if scratch else None, refs)
            counts += score_parts(parts, writer, batch_size=run.settings.batch_size, workers=workers,
                                  progress=progress)
        finally:
            if scratch:
                scratch.cleanup()
        scored += [p.entry.name for p in parts]
        failed |= broken
    progress.close()
    elapsed = time.perf_counter() - started
    rows = sum(counts.values())
    result = ScoreStageResult(scored=scored, skipped=skipped, failed=failed, samples=rows,
                              ok=counts[STATUS_OK], decode_errors=counts[STATUS_DECODE_ERROR],
                              read_errors=counts[STATUS_READ_ERROR], elapsed_s=elapsed,
                              images_per_s=rows / elapsed if elapsed > 0 else 0.0)
    log.info(f"scored {rows} samples in {len(scored)} shards ({result.images_per_s:.1f} img/s); {len(skipped)} "
             f"already done; {len(failed)} unreadable{' (see _failed/)' if failed else ''} -> {run.out}")
    return dataclasses.asdict(result)


def finish_score(plan: ScorePlan, markers: Mapping[str, dict[str, Any]],
                 errors: Mapping[str, BaseException]) -> ScoreStageResult:
    """The run's counts over its jobs; a job that raised counts each of its shards as failed."""
    jobs = [ScoreStageResult(**m) for m in markers.values()]
    failed = {name: why for job in jobs for name, why in job.failed.items()}
    for label, exc in errors.items():
        failed |= {name: f"{type(exc).__name__}: {exc}" for name in plan.group(label)}
    elapsed = time.time() - plan.started
    rows = sum(j.samples for j in jobs)
    return ScoreStageResult(scored=[n for j in jobs for n in j.scored],
                            skipped=plan.skipped + [n for j in jobs for n in j.skipped], failed=failed,
                            samples=rows, ok=sum(j.ok for j in jobs), decode_errors=sum(j.decode_errors for j in jobs),
                            read_errors=sum(j.read_errors for j in jobs), elapsed_s=elapsed,
                            images_per_s=rows / elapsed if elapsed > 0 else 0.0)


class ScoreStage:
    """The score stage's four steps (dede_core.stages.protocol); a job is a group of shards."""

    name, unit = "score", "shard groups"

    def plan(self, run: ScoreRun) -> ScorePlan:
        return plan_score(run)

    def job_name(self, job: ScoreJob) -> str:
        return job_label(job.names)

    def place(self, job: ScoreJob, where: Placement) -> ScoreJob:
        """On a worker pinned to one GPU that GPU is cuda (cuda:0); decoders are capped by the worker's CPUs."""
        s = job.run.settings
        device = "cuda" if where.pinned_gpu and s.device.startswith("cuda") else s.device
        workers = s.workers
        if where.decode_limit is not None:
            workers = min(decode_workers(device) if workers is None else workers, where.decode_limit)
        settings = dataclasses.replace(s, device=device, workers=workers)
        return dataclasses.replace(job, run=dataclasses.replace(job.run, settings=settings))

    def run_job(self, job: ScoreJob) -> dict[str, Any]:
        return score_job(job)

    def finish(self, plan: ScorePlan, markers: Mapping[str, dict[str, Any]],
               errors: Mapping[str, BaseException]) -> ScoreStageResult:
        return finish_score(plan, markers, errors)


SCORE = ScoreStage()


def score_shards(shards_dir: str, *, detector: str, out_dir: str, score: ScoreConfig = ScoreConfig(),
                 knn_k: int = 10, with_embedding: bool = False, batch_size: int = 256, workers: int | None = None,
                 device: str = "cpu", shards: list[str] | None = None, progress: bool = True,
                 encoder: str | None = None, reuse_detector: bool = False) -> ScoreStageResult:
    """Score every sample of a shards folder (or the named `shards` of it) into OUT/<shard>.parquet: the score
    stage's steps in this process, every pending shard in one job (one DataLoader, batches across shards).

    Rerunning skips finished shards, retries failed ones, and refuses if the detector or settings changed.
    `shards=[]` scores no shard but writes OUT/run.json and OUT/calibration.parquet.
    `encoder`: the victim's spec, when the detector's own must not be trusted to run code (checkpoint.load_detector).
    `reuse_detector`: keep the loaded detector for the next call in this process.
    SHARDS and OUT may be fsspec URLs (dede_core.io.storage): shards are then downloaded one call at a time.
    """
    settings = ScoreSettings(score=score, knn_k=knn_k, with_embedding=with_embedding, batch_size=batch_size,
                             workers=workers, device=device, encoder=encoder, group_size=None)
    run = ScoreRun(os.fspath(shards_dir), os.fspath(detector), os.fspath(out_dir), settings, only=shards,
                   progress=progress)
    try:
        return run_in_order(SCORE, run, progress=progress)
    finally:
        if not reuse_detector:
            forget_detector(run.detector, encoder_spec=encoder)

