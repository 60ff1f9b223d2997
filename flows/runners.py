"""Where the score and clean flows run their shard tasks: `--runner local | dask | dask://HOST:PORT`.

    local            threads in the flow's own process, --max-parallel at a time (the default)
    dask             a Dask cluster started for the run on this machine: one worker process per GPU, pinned
                     to it (CUDA_VISIBLE_DEVICES) and holding the Dask resource GPU=1, or, without GPUs,
                     --dask-workers CPU processes sharing the cores
    dask://HOST:PORT an existing Dask scheduler; its workers need dede installed, PREFECT_API_URL pointing at
                     a Prefect server they can reach and, for GPU work, `--resources GPU=1` each

Tasks that use a GPU are annotated to need GPU=1, so Dask never runs two of them on one GPU at once, whatever
a worker's thread count. Each worker process loads the detector once (dede_core.detector.cache).
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Iterator, Callable

from prefect import Task
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from dede_core.io.loader import usable_cores

LOCAL, DASK = "local", "dask"
GPU = "GPU"  # the Dask worker resource one GPU task holds


@dataclass(frozen=True)
class Runner:
    """A parsed --runner."""

    kind: str  # local | dask
    address: str | None = None  # scheduler of an existing Dask cluster (tcp://HOST:PORT); None: start one
    workers: int | None = None  # CPU worker processes of a cluster started here (None: 2); ignored with GPUs


def parse_runner(text: str, *, workers: int | None = None) -> Runner:
    """'local', 'dask' or 'dask://HOST:PORT' -> Runner; ValueError for anything else."""
    if isinstance(workers, bool) or (workers is not None and (not isinstance(workers, int) or workers < 1)):
        raise ValueError(f"dask workers must be an int >= 1, got {workers!r}")
    if text == LOCAL:
        return Runner(LOCAL)
    if text == DASK:
        return Runner(DASK, workers=workers)
    if text.startswith("dask://") and len(text) > len("dask://"):
        if workers is not None:
            raise ValueError("--dask-workers sizes a cluster started here; an existing one (dask://) has its own")
        return Runner(DASK, address="tcp://" + text.removeprefix("dask://"))
    raise ValueError(f"--runner must be local, dask or dask://HOST:PORT (a Dask scheduler), got {text!r}")


@dataclass(frozen=True)
class Engine:
    """Where a stage's jobs run: the --runner, --max-parallel and --dask-workers options as one object."""

    runner: str = LOCAL  # local | dask | dask://HOST:PORT
    max_parallel: int = 1  # jobs at a time on the local runner (threads); 1 suits a CPU, whose cores one job uses
    dask_workers: int | None = None  # CPU worker processes of a Dask cluster started here (None: 2)

    def __post_init__(self) -> None:
        value = self.max_parallel
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_parallel must be an int >= 1, got {value!r}")
        self.parse()  # refuse a bad runner before any work

    def parse(self) -> Runner:
        return parse_runner(self.runner, workers=self.dask_workers)


@dataclass(frozen=True)
class WorkerPlan:
    """One Dask worker process of a cluster started here."""

    name: str
    env: dict[str, str]  # CUDA_VISIBLE_DEVICES pins a GPU worker to its GPU
    resources: dict[str, float] = field(default_factory=dict)  # {"GPU": 1} on a GPU worker


@dataclass(frozen=True)
class ClusterPlan:
    workers: list[WorkerPlan]
    decode_workers: int  # DataLoader processes per scoring task: the CPUs left over, shared by the workers
    torch_threads: int  # torch CPU threads per worker process (OMP_NUM_THREADS)


def plan_cluster(*, gpus: int, cpus: int, workers: int | None = None,
                 visible: list[str] | None = None) -> ClusterPlan:
    """One process per GPU, each pinned to its GPU, with (cpus - gpus) // gpus decoding processes per task;
    without GPUs, `workers` (default 2) processes sharing the cores for torch and decoding in the process.
    visible: this process' CUDA_VISIBLE_DEVICES entries, when set: worker i gets the i-th of them."""
    if gpus > 0:
        ids = visible[:gpus] if visible else [str(i) for i in range(gpus)]
        plans = [WorkerPlan(name=f"gpu{i}", env={"CUDA_VISIBLE_DEVICES": device}, resources={GPU: 1})
                 for i, device in enumerate(ids)]
        return ClusterPlan(workers=plans, decode_workers=max(0, (cpus - gpus) // gpus), torch_threads=1)
    n = workers or 2
    return ClusterPlan(workers=[WorkerPlan(name=f"cpu{i}", env={}) for i in range(n)], decode_workers=0,
                       torch_threads=max(1, cpus // n))


def start_cluster(plan: ClusterPlan):
    """A distributed SpecCluster on loopback with one Nanny process per WorkerPlan (one task thread each)."""
    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    specs = {w.name: {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "env": dict(w.env),
                                                "resources": dict(w.resources) or None}}
             for w in plan.workers}
    # Thread counts must be in a worker's environment before it starts (torch reads them once); Dask copies
    # them from this process' environment when it spawns a worker, so they are set here while it does.
    threads = {name: str(plan.torch_threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    saved = {name: os.environ.get(name) for name in threads}
    os.environ.update(threads)
    try:  # non-daemonic workers may start DataLoader decoding processes of their own
        with dask.config.set({"distributed.worker.daemon": False}):
            return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=40, name="dede")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def worker_identity() -> dict[str, Any]:
    """Who ran a task: host, process id, and the GPU it is pinned to (None on a CPU worker)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}


@contextlib.contextmanager
def _api_for_workers() -> Iterator[None]:
    """Worker processes must report to this flow's Prefect server. Without PREFECT_API_URL that server is a
    temporary one only this process knows of: name it in the settings that travel with each task."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if not server.running:
        server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


class ShardRunner:
    """Runs (task, parameters) calls on the chosen runner and hands back each result or exception.

    with ShardRunner(parse_runner("dask"), max_parallel=1, gpu=False) as runner:
        results = runner.run([(score_task, {...}), ...])
    """

    def __init__(self, runner: Runner, *, max_parallel: int = 1, gpu: bool = False) -> None:
        self.runner, self.max_parallel, self.gpu = runner, max_parallel, gpu
        self.decode_limit: int | None = None  # decoding processes per task on a cluster started here
        self._stack = contextlib.ExitStack()
        self._task_runner: Any = None

    def __enter__(self) -> ShardRunner:
        if self.runner.kind == LOCAL:
            self._task_runner = self._stack.enter_context(ThreadPoolTaskRunner(max_workers=self.max_parallel))
            return self
        from prefect_dask import DaskTaskRunner

        address = self.runner.address
        if address is None:
            gpus = gpu_count() if self.gpu else 0
            if self.gpu and not gpus:
                raise ValueError("a CUDA device was asked for but no GPU is visible here; use --device cpu")
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            plan = plan_cluster(gpus=gpus, cpus=usable_cores(), workers=self.runner.workers,
                                visible=visible or None)
            cluster = self._stack.enter_context(start_cluster(plan))
            address, self.decode_limit = cluster.scheduler_address, plan.decode_workers
        self._stack.enter_context(_api_for_workers())
        self._task_runner = self._stack.enter_context(DaskTaskRunner(address=address))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def run(self, calls: list[tuple[Task, dict[str, Any]]],
            on_done: Callable[[int], None] | None = None) -> list[Any]:
        """Submit every call, wait for all; each entry is the task's return value or the exception it raised.
        on_done(n) is called each time another call finishes (n finished so far), in this process."""
        import dask
        from prefect.futures import as_completed

        annotate = dask.annotate(resources={GPU: 1}) if self.gpu and self.runner.kind == DASK \
            else contextlib.nullcontext()
        with annotate:
            futures = [self._task_runner.submit(task, parameters) for task, parameters in calls]
        for done, _ in enumerate(as_completed(futures), start=1):
            if on_done is not None:
                on_done(done)
        wait(futures)
        return [future.result(raise_on_failure=False) for future in futures]
