"""Run any stage on any engine: one Prefect task per step of the stage protocol (dede_core.stages.protocol).

    plan-<stage>       in the flow's process: claims the output folder, fixes the jobs
    <stage>-<job>      one task per job, on the engine (threads here, or Dask workers; flows/runners.py),
                       retried only for transient errors
    finish-<stage>     in the flow's process: the folder's final files from the jobs' markers

A job that fails does not stop the others; the stage's finish decides what a failure means (the score stage
reports the shards, the clean stage raises the first error). Every step resumes from markers on disk, so
rerunning the flow is its recovery procedure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE

from dede_core.stages.protocol import Placement, Stage
from flows import retry_transient
from flows.runners import LOCAL, Engine, ShardRunner, worker_identity


@dataclass(frozen=True)
class StageRun:
    """What run_stage did: the plan, the stage's result, and who ran each job (job name -> "host:pid")."""

    plan: Any
    result: Any
    workers: dict[str, str]


@task(cache_policy=NONE)
def plan_task(stage: Stage, config: Any) -> Any:
    return stage.plan(config)


# Retried only for transient errors (a flaky file system); a ValueError fails the same way every time.
@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def job_task(stage: Stage, job: Any) -> dict[str, Any]:
    return {"marker": stage.run_job(job), "worker": worker_identity()}


@task(cache_policy=NONE)
def finish_task(stage: Stage, plan: Any, markers: Mapping[str, dict], errors: Mapping[str, BaseException]) -> Any:
    return stage.finish(plan, markers, errors)


def run_stage(stage: Stage, config: Any, engine: Engine, *, gpu: bool = False) -> StageRun:
    """Plan, run every job on `engine` (gpu: the jobs need a GPU each), finish; call it inside a flow."""
    plan = plan_task.with_options(name=f"plan-{stage.name}")(stage, config)
    jobs = plan.jobs()
    results: list[Any] = []
    if jobs:
        where = engine.parse()
        # The run's page in the Prefect UI shows how many of this stage's jobs are done, updated as each finishes.
        progress = create_progress_artifact(progress=0.0, key=f"dede-{stage.name}-progress",
                                            description=f"dede {stage.name}: {len(jobs)} jobs (shards or shard groups)")
        with ShardRunner(where, max_parallel=engine.max_parallel, gpu=gpu) as pool:
            placement = Placement(pinned_gpu=gpu and where.kind != LOCAL, decode_limit=pool.decode_limit)
            run = job_task.with_options(name=f"{stage.name}-job")
            results = pool.run([(run.with_options(task_run_name=f"{stage.name}-{stage.job_name(job)}"),
                                 {"stage": stage, "job": stage.place(job, placement)}) for job in jobs],
                               on_done=lambda n: update_progress_artifact(progress, 100.0 * n / len(jobs)))
    markers, errors, workers = {}, {}, {}
    for job, result in zip(jobs, results):
        name = stage.job_name(job)
        if isinstance(result, BaseException):  # after any retries
            errors[name] = result
        else:
            markers[name] = result["marker"]
            workers[name] = f"{result['worker']['host']}:{result['worker']['pid']}"
    finished = finish_task.with_options(name=f"finish-{stage.name}")(stage, plan, markers, errors)
    return StageRun(plan=plan, result=finished, workers=workers)
