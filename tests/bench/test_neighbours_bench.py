"""dede bench neighbours' machinery on a tiny corpus: the stage runs in a child process, recall is measured
against brute force, the planted cluster is reported, the report is written."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("faiss")

from bench import neighbours as bn  # noqa: E402
from dede_core.stages.neighbours import NeighboursSettings  # noqa: E402


def test_bench_reports_time_memory_recall_and_the_planted_cluster(tmp_path):
    settings = NeighboursSettings(exact_limit=1000, pca_dim=16)
    report = bn.run_bench([3000], 32, settings, str(tmp_path / "work"), queries=200)
    (row,) = report["rows"]
    assert row["summary"]["index"]["kind"] == "ivf" and row["peak_rss_mib"] > 0 and row["recall"] >= 0.9
    assert row["planted"]["planted"] >= 1 and len(row["planted"]["groups"]) == 1
    md, _ = bn.write_report(report, str(tmp_path / "results"), "dede bench neighbours --sizes 3000 --dim 32")
    assert "| 3,000 | IVF" in open(md).read() and not os.listdir(tmp_path / "work")
