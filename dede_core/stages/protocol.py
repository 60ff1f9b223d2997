"""The stage protocol: plan -> jobs -> run one job -> finish, whatever runs them.

A stage that writes a folder of per-shard outputs exposes four steps, as datatrove's executors run any
pipeline step the same way:

    plan = stage.plan(config)         claim the output folder, find the work left (in the driver process)
    plan.jobs()                       the pending jobs: small, picklable, each named
    marker = stage.run_job(job)       do one job and write its outputs, marker last (anywhere: a thread, a
                                      Dask worker, a Prefect worker); returns the job's marker
    result = stage.finish(plan, markers, errors)   the folder's final files, from every job's marker

`run_in_order` is the in-process engine the library's one-call API uses; flows/stage.py runs the same four
steps on threads or Dask, adapting each job to where it runs (stage.place: a worker's one GPU, its CPUs). A
rerun plans again from the markers on disk, so recovery needs no engine state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from dede_core.io.progress import Progress

Config = TypeVar("Config")
Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Placement:
    """Where an engine runs a stage's jobs, for the stage to adapt a job to it (Stage.place)."""

    pinned_gpu: bool = False  # on a worker that sees only its own GPU, as cuda:0
    decode_limit: int | None = None  # decoding processes a job may start there; None: as many as it asks


class PlanOf(Protocol[Job]):
    """What a stage's plan offers the engine."""

    def jobs(self) -> list[Job]:
        """The jobs left to do; [] when the folder is complete."""


Plan = TypeVar("Plan", bound=PlanOf)


class Stage(Protocol, Generic[Config, Plan, Job, Result]):
    """One stage's four steps (dede_core.stages.score.SCORE, dede_core.stages.clean.CLEAN)."""

    name: str  # names the engine's tasks: plan-<name>, <name>-<job>, finish-<name>
    unit: str  # what one job covers, for progress lines

    def plan(self, config: Config) -> Plan:
        """Claim the output folder (refusing other settings) and fix the jobs left to do."""

    def job_name(self, job: Job) -> str:
        """A short label of one job (its shard or shard range): the key of its marker in finish."""

    def place(self, job: Job, where: Placement) -> Job:
        """The job as it runs at `where` (a device or process count adapted); the same job otherwise."""

    def run_job(self, job: Job) -> dict[str, Any]:
        """Do one job, writing its outputs and its marker last; returns the marker."""

    def finish(self, plan: Plan, markers: Mapping[str, dict[str, Any]],
               errors: Mapping[str, BaseException]) -> Result:
        """The folder's final files from the markers of the jobs run since `plan` (job name -> marker);
        errors: job name -> what a failed job raised (its outputs are not written; a rerun redoes it)."""


def run_in_order(stage: Stage[Config, Plan, Job, Result], config: Config, *, progress: bool = True) -> Result:
    """Plan, run every job in this process one after the other, finish. The first failing job's error is
    raised at once: the jobs before it keep their markers, and rerunning resumes after them."""
    plan = stage.plan(config)
    jobs = plan.jobs()
    bar = Progress(len(jobs), desc=stage.name, unit=stage.unit, quiet=not progress or len(jobs) < 2)
    markers = {}
    for job in jobs:
        markers[stage.job_name(job)] = stage.run_job(job)
        bar.update(1)
    if jobs:
        bar.close()
    return stage.finish(plan, markers, {})
