"""Flow: the corpus-level neighbourhoods of a scores folder, the neighbours stage
(dede_core.stages.neighbours.NEIGHBOURS) run by flows/stage.py.

The plan claims OUT and builds the index over every embedding (in the flow's process); then one task per group
of shards queries it, in parallel threads or on Dask workers (flows/runners.py), each loading the index once
per process; finish computes the statistics over the whole corpus' lists.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from dede_core.stages.neighbours import NEIGHBOURS, NeighboursRun, NeighboursSettings
from flows.runners import Engine
from flows.stage import run_stage


@flow(name="dede-neighbours")
def neighbours_flow(scores: str, out: str, settings: NeighboursSettings = NeighboursSettings(),
                    engine: Engine = Engine()) -> dict:
    """Every sample's neighbourhood from SCORES/embeddings/ into OUT/<stem>.parquet and OUT/summary.json.
    An unchanged scores folder is not recomputed; a grown one recomputes the index and every neighbourhood.
    Returns OUT/summary.json's record with `recomputed` and `workers` (job -> "host:pid")."""
    done = run_stage(NEIGHBOURS, NeighboursRun(scores, out, settings), engine,
                     gpu=settings.device.startswith("cuda"))
    result = done.result
    get_run_logger().info(f"{result.summary['embeddings']} samples, {result.summary['groups']} tight groups "
                          f"({'recomputed' if result.recomputed else 'already complete'}) -> {out}")
    return result.summary | {"recomputed": result.recomputed, "workers": done.workers}
