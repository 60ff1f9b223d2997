"""A reviewer's decisions on top of the rule: keep takes a sample out of the dropped ones, drop adds it with the
reviewer's note; the decisions file is part of the clean folder's identity; summary.json says what changed."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dede_core.stages.clean import clean
from dede_core.stages.decisions import apply_decisions, read_decisions
from dede_core.stages.select import Rule, select
from schemas.tables import DECISIONS
from test_select import png, row, write_scores, write_shards


def decisions_file(path, rows) -> str:
    now = datetime.now(timezone.utc)
    pq.write_table(pa.Table.from_pylist([{"key": k, "decision": d, "note": n, "decided_at": now, "group": None}
                                         for k, d, n in rows], schema=DECISIONS), path)
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    keys = [f"k{i}" for i in range(8)]
    write_shards(str(tmp_path / "shards"), [[{"__key__": k, "png": png(i)} for i, k in enumerate(keys)]])
    write_scores(str(tmp_path / "scores"), [row(k, "000000.tar", i, 100.0 * (i + 1)) for i, k in enumerate(keys)])
    return str(tmp_path / "shards"), str(tmp_path / "scores")


def test_keep_and_drop_change_the_selection(corpus, tmp_path):
    shards, scores = corpus
    sel = select(scores, Rule.threshold(550.0))  # drops k5, k6, k7
    path = decisions_file(tmp_path / "d.parquet", [("k6", "keep", "twin"), ("k1", "drop", "sticker"),
                                                   ("nope", "drop", None)])
    after = apply_decisions(sel, path)
    assert dict(zip(after.dropped.column("key").to_pylist(), after.dropped.column("reason").to_pylist())) == {
        "k1": "reviewer: sticker", "k5": "score > 550.00 (threshold)", "k7": "score > 550.00 (threshold)"}
    assert (after.counts.kept, after.counts.dropped) == (5, 3)
    assert "2 reviewer decision(s) changed the verdict (1 kept, 1 dropped)" in after.how

    result = clean(shards, scores, tmp_path / "out", Rule.threshold(550.0), decisions=path, progress=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["decisions"]["changed"] == 2 and summary["decisions"]["kept"] == 1
    assert "reviewer decision" in summary["how"] and result.counts.dropped == 3
    other = decisions_file(tmp_path / "e.parquet", [("k6", "keep", None)])
    with pytest.raises(ValueError, match="decisions"):
        clean(shards, scores, tmp_path / "out", Rule.threshold(550.0), decisions=other, progress=False)


def test_the_latest_decision_wins_and_bad_files_are_refused(tmp_path):
    early, late = datetime(2024, 1, 1, tzinfo=timezone.utc), datetime(2024, 1, 2, tzinfo=timezone.utc)
    pq.write_table(pa.Table.from_pylist([{"key": "a", "decision": "drop", "note": None, "decided_at": late,
                                          "group": None},
                                         {"key": "a", "decision": "keep", "note": None, "decided_at": early,
                                          "group": None}], schema=DECISIONS), tmp_path / "d.parquet")
    assert read_decisions(tmp_path / "d.parquet").column("decision").to_pylist() == ["drop"]
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="lacks the column"):
        read_decisions(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no decisions file"):
        read_decisions(tmp_path / "missing.parquet")
