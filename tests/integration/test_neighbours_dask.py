"""The neighbours stage as the dede-neighbours flow on a 2-process Dask cluster writes what the in-process
run writes. About two minutes here (a Prefect server and a Dask cluster start), so it runs with the
integration tests (make test-integration)."""

from __future__ import annotations

import os
import sys

import cloudpickle
import pyarrow.parquet as pq
import pytest

pytest.importorskip("faiss")
distributed = pytest.importorskip("distributed")

from dede_core.stages.neighbours import NeighboursSettings, neighbours  # noqa: E402
from flows.neighbours import neighbours_flow  # noqa: E402
from flows.runners import Engine  # noqa: E402
from tests.stages.test_neighbours import SHARDS, corpus_arrays, write_scores  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = pytest.mark.integration


def test_dask_run_writes_what_the_local_run_writes(tmp_path, prefect_harness):
    x, thumbs = corpus_arrays()
    scores = write_scores(tmp_path, x, thumbs)
    settings = NeighboursSettings(rows_per_job=100)
    neighbours(scores, tmp_path / "local", settings, progress=False)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       host="127.0.0.1")
    try:
        address = "dask://" + cluster.scheduler_address.removeprefix("tcp://")
        summary = neighbours_flow(scores, str(tmp_path / "dask"), settings, Engine(address))
    finally:
        cluster.close(timeout=60)
    assert summary["recomputed"] and len(summary["workers"]) == SHARDS
    for s in range(SHARDS):
        name = f"{s:06d}.parquet"
        assert pq.read_table(tmp_path / "local" / name).equals(pq.read_table(os.path.join(tmp_path, "dask", name)))
