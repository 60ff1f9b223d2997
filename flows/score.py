"""Flow: score a shards folder, the score stage (dede_core.stages.score.SCORE) run by flows/stage.py.

The plan pins the settings in OUT/run.json and writes OUT/calibration.parquet; then one task per group of
shards, in parallel threads or on Dask workers (flows/runners.py), all writing into that one folder. A group
that fails does not stop the others; the failures are raised at the end.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from dede_core.stages.score import SCORE, ScoreRun, ScoreSettings
from flows.runners import Engine
from flows.stage import run_stage


class ShardsFailed(RuntimeError):
    """Some shards could not be scored; every other shard's scores are written. failed: shard -> why."""

    def __init__(self, message: str, failed: dict[str, str]) -> None:
        super().__init__(message, failed)
        self.message, self.failed = message, failed

    def __str__(self) -> str:
        return self.message


@flow(name="dede-score")
def score_flow(shards: str, detector: str, out: str, settings: ScoreSettings = ScoreSettings(),
               engine: Engine = Engine()) -> dict:
    """Score every shard of SHARDS into OUT/<shard>.parquet; finished shards are skipped.

    settings.group_size shards per task. engine (flows/runners.py): local runs max_parallel tasks at a time in
    threads; dask runs them on a Dask cluster started here (dask_workers CPU processes, or one per GPU) or at
    dask://HOST:PORT. Returns counts over this run: scored, skipped, failed (shard -> why), samples, ok,
    decode_errors, read_errors, and workers (shard -> "host:pid" of the process that scored it). Raises
    ShardsFailed after every group finished if any shard failed.
    """
    done = run_stage(SCORE, ScoreRun(shards, detector, out, settings), engine,
                     gpu=settings.device.startswith("cuda"))
    result, plan = done.result, done.plan
    workers = {}  # shard -> the process that scored it
    for job in plan.jobs():
        who = done.workers.get(SCORE.job_name(job))
        workers |= {name: who for name in job.names if who and name in result.scored}
    summary = {"scored": result.scored, "skipped": result.skipped, "failed": result.failed, "workers": workers,
               "samples": result.samples, "ok": result.ok, "decode_errors": result.decode_errors,
               "read_errors": result.read_errors}
    get_run_logger().info(f"{len(result.scored)} shards scored, {len(result.skipped)} already done, "
                          f"{len(result.failed)} failed; {result.samples} samples -> {out}")
    if result.failed:
        total = len(plan.skipped) + sum(len(g) for g in plan.groups)
        name, why = next(iter(result.failed.items()))
        raise ShardsFailed(f"{len(result.failed)} of {total} shards could not be scored (e.g. {name}: {why}); "
                           f"the other shards' scores are in {out}; fix the cause and rerun to score the rest",
                           result.failed)
    return summary
