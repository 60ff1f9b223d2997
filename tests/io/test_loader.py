"""Decoding processes sized to the cores the model leaves (issue #15)."""

import dataclasses

import pytest
import torch

from dede_core.io.loader import MAX_DECODE_WORKERS, decode_workers
from dede_core.stages.protocol import Placement
from dede_core.stages.score import SCORE, ScoreJob, ScoreRun, ScoreSettings


@pytest.mark.parametrize("device, cores, threads, expected", [
    ("cpu", 2, 2, 1),  # torch's threads hold every core: one process fills the model's serial stretches
    ("cpu", 16, 12, 4),  # the cores beyond torch's threads
    ("cpu", 16, 16, 1),
    ("cpu", 4, 8, 1),  # more threads than cores: still the one
    ("cpu", 1, 1, 0),  # one core: decode in this process, between batches
    ("cuda", 16, 16, 8),  # the model is on the GPU: every core but this process's, at most 8
    ("cuda:1", 4, 4, 3),
    ("cuda", 1, 1, 0),
])
def test_decode_workers_are_the_cores_the_model_leaves(device, cores, threads, expected):
    assert decode_workers(device, cores=cores, threads=threads) == expected
    assert decode_workers(device, cores=64, threads=1) == MAX_DECODE_WORKERS


def test_decode_workers_default_to_torch_threads_on_the_cpu():
    threads = torch.get_num_threads()
    assert decode_workers("cpu", cores=threads) == min(1, threads - 1)
    assert decode_workers("cpu", cores=threads + 3) == 3


def test_the_score_stage_resolves_the_default_where_the_job_runs():
    job = ScoreJob(run=ScoreRun("shards", "detector.pt", "out", ScoreSettings(device="cpu")), names=["000000.tar"])
    assert SCORE.place(job, Placement()).run.settings.workers is None  # resolved by the job, on its machine
    assert SCORE.place(job, Placement(decode_limit=0)).run.settings.workers == 0
    asked = dataclasses.replace(job, run=dataclasses.replace(job.run, settings=ScoreSettings(workers=3)))
    assert SCORE.place(asked, Placement(decode_limit=2)).run.settings.workers == 2
    assert SCORE.place(asked, Placement()).run.settings.workers == 3
