"""Flow: score a shards folder, one task per group of shards (each task: dede_core.stages.score.score_shards).

The first task scores no shard (`shards=[]`): it pins the settings in OUT/run.json and writes
OUT/calibration.parquet, so the group tasks that follow, in parallel threads or on Dask workers
(flows/runners.py), all write into one folder that refuses other settings. A group that fails does not stop the
others; the failures are raised at the end.
"""

from __future__ import annotations

import dataclasses

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from dede_core.stages.score import score_shards
from dede_core.detector.scorer import ScoreConfig
from dede_core.stages.shard import list_shards
from flows import retry_transient
from flows.runners import LOCAL, ShardRunner, parse_runner, worker_identity

COUNTS = ("samples", "ok", "decode_errors", "read_errors")


class ShardsFailed(RuntimeError):
    """Some shards could not be scored; every other shard's scores are written. failed: shard -> why."""

    def __init__(self, message: str, failed: dict[str, str]) -> None:
        super().__init__(message, failed)
        self.message, self.failed = message, failed

    def __str__(self) -> str:
        return self.message


def _label(group: list[str]) -> str:
    """'000003' or '000004..000007': names a group's task run."""
    stems = [name.removesuffix(".tar") for name in group]
    return stems[0] if len(stems) == 1 else f"{stems[0]}..{stems[-1]}"


@task(name="prepare-scores", cache_policy=NONE)
def prepare_task(shards: str, detector: str, out: str, score: ScoreConfig, knn_k: int, with_embedding: bool,
                 batch_size: int, device: str, encoder: str | None) -> None:
    """OUT/run.json and OUT/calibration.parquet; checks the detector and settings before any shard is scored."""
    score_shards(shards, detector=detector, out_dir=out, score=score, knn_k=knn_k, with_embedding=with_embedding,
                 batch_size=batch_size, workers=0, device=device, shards=[], encoder=encoder, reuse_detector=True)


# Retried only for transient errors (a flaky file system); a ValueError fails the same way every time.
@task(name="score-shards", cache_policy=NONE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def score_task(shards: str, names: list[str], detector: str, out: str, score: ScoreConfig, knn_k: int,
               with_embedding: bool, batch_size: int, workers: int, device: str, encoder: str | None) -> dict:
    result = score_shards(shards, detector=detector, out_dir=out, score=score, knn_k=knn_k,
                          with_embedding=with_embedding, batch_size=batch_size, workers=workers, device=device,
                          shards=names, encoder=encoder, reuse_detector=True)
    worker = worker_identity()
    get_run_logger().info(f"{_label(names)}: scored {len(result.scored)}, already done "
                          f"{len(result.skipped)}, unreadable {len(result.failed)}; {result.samples} samples at "
                          f"{result.images_per_s:.1f} img/s on {worker['host']} pid {worker['pid']}")
    return dataclasses.asdict(result) | {"worker": worker}


@flow(name="dede-score")
def score_flow(shards: str, detector: str, out: str, *, seed: int = 0, draws: int = 1, visible: int | None = None,
               chunk: int = 64, knn_k: int = 10, with_embedding: bool = False, batch_size: int = 256,
               workers: int = 0, device: str = "cpu", group_size: int = 1, max_parallel: int = 1,
               encoder: str | None = None, runner: str = "local", dask_workers: int | None = None,
               cpu_bf16: bool = False) -> dict:
    """Score every shard of SHARDS into OUT/<shard>.parquet; finished shards are skipped.

    cpu_bf16: bf16 autocast on the CPU too (ScoreConfig). group_size shards per task. runner
    (flows/runners.py): local runs max_parallel tasks at a time in threads (1 suits a CPU, whose cores the torch
    ops of one task already use); dask runs them on a Dask cluster started here (dask_workers CPU processes, or
    one per GPU) or at dask://HOST:PORT. Returns counts over this
    run's groups: scored, skipped, failed (shard -> why), samples, ok, decode_errors, read_errors, and workers
    (shard -> "host:pid" of the process that scored it). Raises ShardsFailed after all groups finished if any
    shard failed.
    """
    for name, value in (("group_size", group_size), ("max_parallel", max_parallel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    score = ScoreConfig(seed=seed, draws=draws, visible=visible, chunk=chunk, cpu_bf16=cpu_bf16)
    common = dict(detector=detector, out=out, score=score, knn_k=knn_k, with_embedding=with_embedding,
                  batch_size=batch_size, device=device, encoder=encoder)
    where = parse_runner(runner, workers=dask_workers)
    prepare_task(shards, **common)
    names = [entry.name for entry in list_shards(shards)]
    groups = [names[i:i + group_size] for i in range(0, len(names), group_size)]
    gpu = device.startswith("cuda")
    if gpu and where.kind != LOCAL:
        common["device"] = "cuda"  # a Dask GPU worker sees only its own GPU, as cuda:0
    with ShardRunner(where, max_parallel=max_parallel, gpu=gpu) as pool:
        decoders = workers if pool.decode_limit is None else min(workers, pool.decode_limit)
        results = pool.run([(score_task.with_options(task_run_name=f"score-{_label(g)}"),
                             {"shards": shards, "names": g, "workers": decoders, **common}) for g in groups])

    summary: dict = {"scored": [], "skipped": [], "failed": {}, "workers": {}} | {k: 0 for k in COUNTS}
    for group, result in zip(groups, results):
        if isinstance(result, BaseException):  # the whole group failed (after any retries)
            summary["failed"].update({n: f"{type(result).__name__}: {result}" for n in group})
            continue
        for key in ("scored", "skipped"):
            summary[key] += result[key]
        summary["workers"].update({n: f"{result['worker']['host']}:{result['worker']['pid']}"
                                   for n in result["scored"]})
        summary["failed"].update(result["failed"])
        for key in COUNTS:
            summary[key] += result[key]
    logger = get_run_logger()
    logger.info(f"{len(summary['scored'])} shards scored, {len(summary['skipped'])} already done, "
                f"{len(summary['failed'])} failed; {summary['samples']} samples -> {out}")
    if summary["failed"]:
        failed = summary["failed"]
        first = next(iter(failed.items()))
        raise ShardsFailed(f"{len(failed)} of {len(names)} shards could not be scored (e.g. {first[0]}: {first[1]}); "
                           f"the other shards' scores are in {out}; fix the cause and rerun to score the rest",
                           failed)
    return summary
