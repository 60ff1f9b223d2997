"""Selection rules: each drops exactly what a Python reading of the rule drops, on hand-built scores folders.

The corpus builders here (shards + manifest, scores, calibration) are shared with test_clean/test_sql/test_report.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dede_core.sql import connect
from dede_core.stages.select import Counts, Rule, fpr_threshold, percentile_name, select
from schemas.tables import CALIBRATION, SCORES, with_metadata

DETECTOR = "d" * 64
ENCODER = "cifar-resnet18?width=8#0123456789abcdef"


def png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: str, shards: list[list[dict]]) -> dict:
    """WebDataset shards 000000.tar, ... from sample dicts ({'__key__', ext: bytes}) plus a dede-shards/1 manifest."""
    os.makedirs(folder, exist_ok=True)
    entries = []
    for i, samples in enumerate(shards):
        name = f"{i:06d}.tar"
        path = os.path.join(folder, name)
        with wds.TarWriter(path, encoder=False) as writer:
            for sample in samples:
                writer.write(sample)
        data = open(path, "rb").read()
        entries.append({"name": name, "samples": len(samples), "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(), "first_key": samples[0]["__key__"],
                        "last_key": samples[-1]["__key__"]})
    manifest = {"format": "dede-shards/1", "source": "/hand/built", "samples_per_shard": 6, "created": "now",
                "shards": entries, "samples": sum(e["samples"] for e in entries), "classes": ["a", "b"]}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


def row(key: str, shard: str, position: int, score: float | None, knn: float | None = None, *,
        status: str = "ok", error: str | None = None, detector: str = DETECTOR) -> dict:
    return {"key": key, "shard": shard, "position": position, "label": 0, "width": 32, "height": 32,
            "status": status, "error": error, "score": score, "draws": 1, "knn_score": knn,
            "detector_hash": detector, "encoder_id": ENCODER}


def write_scores(folder: str, rows: list[dict], calibration: list[tuple[float, float]] | None = None) -> None:
    """One <stem>.parquet per shard (SCORES schema, run config in the metadata) and calibration.parquet."""
    os.makedirs(folder, exist_ok=True)
    schema = with_metadata(SCORES, "scores", json.dumps({"draws": 1}))
    for shard in sorted({r["shard"] for r in rows}):
        mine = [r for r in rows if r["shard"] == shard]
        pq.write_table(pa.Table.from_pylist(mine, schema=schema), os.path.join(folder, shard[:-4] + ".parquet"))
    if calibration is not None:
        table = pa.Table.from_pylist([{"key": f"aux{i}", "score": s, "knn_score": k}
                                      for i, (s, k) in enumerate(calibration)], schema=CALIBRATION)
        pq.write_table(table, os.path.join(folder, "calibration.parquet"))


def scores_fixture(folder: str, n: int = 40, seed: int = 0) -> list[dict]:
    """n rows over two shards with spread-out scores, one decode_error and one ok row without a knn_score."""
    rng = np.random.default_rng(seed)
    rows = [row(f"k{i:03d}", f"{i % 2:06d}.tar", i // 2, float(rng.uniform(100, 1000)), float(rng.uniform(0, 5)))
            for i in range(n)]
    rows[3] = row("k003", "000001.tar", 1, None, None, status="decode_error", error="cannot identify image file")
    rows[4]["knn_score"] = None
    calibration = [(float(s), float(k)) for s, k in zip(rng.uniform(100, 900, 200), rng.uniform(0, 4, 200))]
    write_scores(folder, rows, calibration)
    return rows


def above(rows: list[dict], column: str, t: float) -> set[str]:
    """What the rule should drop, computed in Python: ok rows with a value above t."""
    return {r["key"] for r in rows if r["status"] == "ok" and r[column] is not None and r[column] > t}


def dropped_keys(sel) -> dict[str, str]:
    return dict(zip(sel.dropped.column("key").to_pylist(), sel.dropped.column("reason").to_pylist()))


@pytest.fixture()
def scored(tmp_path):
    folder = str(tmp_path / "scores")
    rows = scores_fixture(folder)
    calibration = pq.read_table(os.path.join(folder, "calibration.parquet"))
    return folder, rows, calibration


def test_threshold_drops_exactly_the_rows_above_it(scored):
    folder, rows, _ = scored
    sel = select(folder, Rule.threshold(600))
    expected = {r["key"] for r in rows if r["status"] == "ok" and r["score"] > 600}
    got = dropped_keys(sel)
    assert set(got) == expected | {"k003"}
    assert got["k003"] == "decode_error: cannot identify image file"
    assert all(got[k] == "score > 600.00 (threshold)" for k in expected)
    assert sel.counts == Counts(total=40, kept=40 - len(got), dropped=len(got), unscored=1)
    assert sum(sel.by_shard.values(), Counts()) == sel.counts
    assert sel.detector_hash == DETECTOR and sel.encoder_id == ENCODER


def test_quantile_uses_the_corpus_own_scores(scored):
    folder, rows, _ = scored
    ok = [r["score"] for r in rows if r["status"] == "ok"]
    sel = select(folder, Rule.quantile(0.8))
    assert sel.threshold == pytest.approx(np.quantile(ok, 0.8))
    assert set(dropped_keys(sel)) == above(rows, "score", sel.threshold) | {"k003"}
    assert "80th percentile of this corpus' own 39 scores" in sel.how


def lognormal_corpus(folder: str, n: int, poisoned: int, seed: int = 0) -> list[dict]:
    """n ok rows with log-normal scores and k-NN distances; the first `poisoned` far from the auxiliary images
    (knn_score) and badly reconstructed (score) next to the rest."""
    rng = np.random.default_rng(seed)
    score, knn = np.exp(rng.normal(0, 0.25, n)), np.exp(rng.normal(1, 0.25, n))
    score[:poisoned] *= 8
    knn[:poisoned] *= 8
    rows = [row(f"k{i:04d}", f"{i % 3:06d}.tar", i // 3, float(score[i]), float(knn[i]),) | {"recon_error": 1.0}
            for i in range(n)]
    write_scores(folder, rows, [(1.0, 1.0)] * 10)
    return rows


def test_the_default_rule_is_the_verdict_at_fdr_005(tmp_path):
    folder = str(tmp_path / "scores")
    lognormal_corpus(folder, 1200, poisoned=24)
    sel = select(folder)
    assert sel.rule == Rule.fdr(0.05) and sel.threshold is None and sel.verdict is not None
    dropped = dropped_keys(sel)
    planted = {f"k{i:04d}" for i in range(24)}
    assert planted <= set(dropped) and len(set(dropped) - planted) <= 2  # BH at 0.05: about 1 false discovery
    assert all(reason.startswith("combined q ") and reason.endswith(" <= fdr 0.05") for reason in dropped.values())
    table = sel.verdict.table.to_pydict()
    assert set(table) >= {"key", "shard", "p_dede", "p_aux_distance", "p_combined", "q_value", "verdict"}
    assert "p_collapse" not in table  # no neighbours folder: the corpus-level signals are not available
    summary = sel.verdict.summary
    assert summary["flagged"] == len(dropped) and summary["signals"]["aux_distance"]["extreme"] >= 20
    assert summary["signals"]["dede"]["extreme"] >= 20 and not summary["signals"]["dede"]["in_verdict"]  # shown
    assert not summary["signals"]["collapse"]["available"] and "flags" in sel.how
    assert sel.to_dict()["verdict"]["flagged"] == len(dropped)


def test_a_clean_corpus_loses_almost_nothing_under_the_default_rule(tmp_path):
    lost = []
    for seed in range(5):
        folder = str(tmp_path / f"scores{seed}")
        lognormal_corpus(folder, 2000, poisoned=0, seed=seed)
        lost.append(select(folder).counts.dropped)
    assert sum(lost) <= 2, lost  # BH controls the family-wise error when nothing is poisoned: <= 5% of runs drop any


def test_fpr_threshold_comes_from_calibration_without_labels(scored):
    folder, rows, calibration = scored
    sel = select(folder, Rule.fpr(0.05))
    expected = float(np.quantile(calibration.column("score").to_numpy(), 0.95))
    assert sel.threshold == pytest.approx(expected, rel=1e-12)
    assert sel.threshold == fpr_threshold(calibration.column("score"), 0.05)
    assert set(dropped_keys(sel)) == above(rows, "score", sel.threshold) | {"k003"}
    assert sel.how.startswith(f"score > {sel.threshold:.2f}, the 95th percentile of 200 held-out calibration scores")
    assert "(fpr target 0.05, chosen without labels)" in sel.how


def test_knn_column_and_missing_knn_values(scored):
    folder, rows, calibration = scored
    sel = select(folder, Rule.fpr(0.1, column="knn_score"))
    assert sel.threshold == pytest.approx(np.quantile(calibration.column("knn_score").to_numpy(), 0.9))
    got = dropped_keys(sel)
    hits = above(rows, "knn_score", sel.threshold)
    assert set(got) == hits | {"k003", "k004"}  # k004 is ok but has no knn_score: unscored for this column
    assert got["k004"] == "ok but no knn_score" and sel.counts.unscored == 2
    assert all(got[k].startswith("knn_score > ") and got[k].endswith("(fpr 0.1)") for k in hits)


def test_where_predicate(scored):
    folder, rows, _ = scored
    sel = select(folder, Rule.where("score > 900 OR knn_score > 3.1"))
    expected = {r["key"] for r in rows if r["status"] == "ok"
                and (r["score"] > 900 or (r["knn_score"] is not None and r["knn_score"] > 3.1))}
    got = dropped_keys(sel)
    assert set(got) == expected | {"k003"}
    assert got[next(iter(expected))] == "where: score > 900 OR knn_score > 3.1"
    assert sel.threshold is None and "predicate" in sel.how


def test_keep_unscored(scored):
    folder, rows, _ = scored
    sel = select(folder, Rule.threshold(600), keep_unscored=True)
    assert "k003" not in dropped_keys(sel)
    assert sel.counts.unscored == 1 and sel.counts.kept + sel.counts.dropped == 40


@pytest.mark.parametrize("make", [
    lambda: Rule.fpr(0), lambda: Rule.fpr(1), lambda: Rule.fpr(1.5), lambda: Rule.fpr(True),
    lambda: Rule.quantile(-0.1), lambda: Rule.quantile("0.9"), lambda: Rule.threshold(float("nan")),
    lambda: Rule.fpr(0.05, column="label"), lambda: Rule.where(""), lambda: Rule.where("score > 1; DROP VIEW scores"),
    lambda: Rule.where("score >"), lambda: Rule.where("score > 1) OR (1=1"), lambda: Rule.where("score, key"),
    lambda: Rule("median", 0.5),
])
def test_bad_rules_are_refused(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("predicate, message", [
    ("nosuchcolumn > 1", "nosuchcolumn"),
    ("score", "not true/false"),
    ("key IN (SELECT column0 FROM read_csv('/etc/passwd'))", "/etc/passwd"),
])
def test_bad_predicates_fail_with_duckdb_message(scored, predicate, message):
    with pytest.raises(ValueError, match=message):
        select(scored[0], Rule.where(predicate))


def test_mixed_detectors_are_refused(tmp_path):
    folder = str(tmp_path / "scores")
    write_scores(folder, [row("a", "000000.tar", 0, 1.0), row("b", "000001.tar", 0, 2.0, detector="e" * 64)])
    with pytest.raises(ValueError, match="mixes scores of 2 detectors"):
        select(folder, Rule.threshold(1.5))


def test_duplicate_keys_and_missing_calibration_are_refused(tmp_path):
    folder = str(tmp_path / "scores")
    write_scores(folder, [row("a", "000000.tar", 0, 1.0), row("a", "000001.tar", 0, 2.0)])
    with pytest.raises(ValueError, match="duplicate keys"):
        select(folder, Rule.threshold(1.5))
    other = str(tmp_path / "other")
    write_scores(other, [row("a", "000000.tar", 0, 1.0)])
    with pytest.raises(ValueError, match="calibration.parquet"):
        select(other, Rule.fpr(0.05))
    with pytest.raises(ValueError, match="no scores files"):
        select(str(tmp_path))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=30), st.floats(0, 1e4))
def test_threshold_matches_python_on_any_scores(tmp_path_factory, scores, t):
    folder = str(tmp_path_factory.mktemp("scores"))
    write_scores(folder, [row(f"k{i}", "000000.tar", i, s) for i, s in enumerate(scores)])
    got = set(dropped_keys(select(folder, Rule.threshold(t))))
    assert got == {f"k{i}" for i, s in enumerate(scores) if s > t}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(width=64)), min_size=1, max_size=40), st.floats(0.001, 0.999))
def test_fpr_threshold_is_the_calibration_quantile_bit_for_bit(tmp_path_factory, values, fpr):
    """fpr_threshold over plain values = DuckDB's quantile over calibration.parquet's finite values, to the bit;
    NULL, NaN and infinite values are left out, and none left is a ValueError."""
    folder = str(tmp_path_factory.mktemp("scores"))
    write_scores(folder, [row("a", "000000.tar", 0, 1.0, 1.0)], [(1.0, v) for v in values])
    conn = connect(folder)
    expected, n = conn.execute("SELECT quantile_cont(knn_score, ?), count(knn_score) FROM calibration "
                               "WHERE isfinite(knn_score)", [1 - fpr]).fetchall()[0]
    conn.close()
    plain = [np.nan if v is None else v for v in values]
    if n == 0:
        with pytest.raises(ValueError, match="no finite"):
            fpr_threshold(plain, fpr)
        return
    assert np.float64(fpr_threshold(plain, fpr)).tobytes() == np.float64(expected).tobytes()
    assert np.float64(select(folder, Rule.fpr(fpr, column="knn_score")).threshold).tobytes() == \
        np.float64(expected).tobytes()


def test_fpr_threshold_refuses_a_bad_fpr():
    for bad in (0, 1, 1.5, True, "0.05"):
        with pytest.raises(ValueError, match="fpr must be a number strictly between 0 and 1"):
            fpr_threshold([1.0, 2.0], bad)


def test_percentile_names():
    assert [percentile_name(q) for q in (0.95, 0.99, 0.975, 0.01, 0.02, 0.03, 0.11, 0.21, 0.5)] == [
        "95th", "99th", "97.5th", "1st", "2nd", "3rd", "11th", "21st", "50th"]
