"""One verdict-suite case judged on its realistic corpora through the shipped stages: each corpus is sharded,
scored by the case's default detector, its neighbours computed, and selected with the default rule; the same
signals are also combined in the other designs tried, side by side (VARIANTS), and with the old --fpr 0.05."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench import metrics
from bench.verdict_corpora import POISON_MARK, RATES, write_near_duplicates, write_poisoned
from dede_core.signals.gather import neighbours_files, signal_frame
from dede_core.signals.registry import signals
from dede_core.signals.verdict import VerdictConfig, decide
from dede_core.sql import connect
from dede_core.stages.neighbours import neighbours
from dede_core.stages.score import score_shards
from dede_core.stages.select import Rule, select, valid_sql
from dede_core.stages.shard import write_shards
from bench.cases import Case

# The designs measured side by side: (what changes from the default, VerdictConfig overrides, frame change).
VARIANTS: dict[str, tuple[dict, Callable[[dict], dict] | None]] = {
    "default (aux_distance + 2 x collapse; bulk null; weighted Cauchy)": ({}, None),
    "with dede (the design chosen on the sticker cases)": ({"signals": ("dede", "aux_distance", "collapse")}, None),
    "equal weights, with dede": ({"signals": ("dede", "aux_distance", "collapse"), "equal": True}, None),
    "Bonferroni (m x min p) instead of Cauchy, with dede": (
        {"signals": ("dede", "aux_distance", "collapse"), "combine": "bonferroni"}, None),
    "calibration null for the scores signals, with dede": (
        {"signals": ("dede", "aux_distance", "collapse"), "null": "calibration"}, None),
    "dede alone": ({"signals": ("dede",)}, None),
    "dede + aux_distance": ({"signals": ("dede", "aux_distance")}, None),
    "collapse alone": ({"signals": ("collapse",)}, None),
    "tightness (near-duplicate-aware k-distance) instead of collapse, with dede": (
        {"signals": ("dede", "aux_distance", "tightness")}, None),
    "tightness on kdist_5 (no near-duplicate rule) instead of collapse, with dede": (
        {"signals": ("dede", "aux_distance", "tightness")}, lambda f: f | {"kdist_distinct": f["kdist_5"]}),
    "with dede + outlier (DAO)": ({"signals": ("dede", "aux_distance", "collapse", "outlier")}, None),
}


def _frame(scores: Path, neighbours_dir: Path) -> dict[str, np.ndarray]:
    conn = connect(str(scores))
    try:
        frame = signal_frame(conn, "scores", valid_sql("score"), str(neighbours_dir))
    finally:
        conn.close()
    import pyarrow.parquet as pq  # the neighbours table's other columns, for the variants

    extra = pq.read_table(neighbours_files(str(neighbours_dir)), columns=["key", "kdist_5"])
    by_key = dict(zip(extra.column("key").to_pylist(), extra.column("kdist_5").to_pylist()))
    frame["kdist_5"] = np.array([np.nan if by_key.get(k) is None else by_key[k] for k in frame["key"]])
    return frame


def _cut_figures(flagged: set[str], poison: set[str], total: int) -> dict[str, Any]:
    clean_total = total - len(poison)
    hits = len(flagged & poison)
    return {"flagged": len(flagged), "precision": hits / len(flagged) if flagged else None,
            "recall": hits / len(poison) if poison else None,
            "clean_lost": (len(flagged) - hits) / clean_total if clean_total else None}


def _auroc(values: np.ndarray, positive: np.ndarray) -> float | None:
    finite = np.isfinite(values)
    if positive.sum() == 0 or (~positive).sum() == 0:
        return None
    filled = np.where(finite, values, np.nanmin(values[finite]) if finite.any() else 0.0)
    return metrics.auroc(filled[~positive], filled[positive])


def judge(frame: dict[str, np.ndarray], calibration: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """Every variant's cut and AUROC, and each signal's AUROC (as -log10 of its p-value), on one corpus."""
    keys = np.asarray(frame["key"]).astype(str)
    positive = np.char.find(keys, POISON_MARK) >= 0
    poison = set(keys[positive])
    out: dict[str, Any] = {"samples": len(keys), "poisoned": int(positive.sum()), "variants": {}, "signals": {}}
    for name, (overrides, change) in VARIANTS.items():
        verdict = decide(change(frame) if change else frame, VerdictConfig(**overrides), calibration)
        table = verdict.table.to_pydict()
        flagged = {k for k, v in zip(table["key"], table["verdict"]) if v}
        evidence = -np.log10(np.clip(np.asarray(table["p_combined"], dtype=float), 1e-300, 1))
        out["variants"][name] = _cut_figures(flagged, poison, len(keys)) | {"auroc": _auroc(evidence, positive)}
        if not overrides and change is None:
            for signal in signals():
                if signal.p_column in table:
                    p = np.clip(np.asarray(table[signal.p_column], dtype=float), 1e-300, 1)
                    out["signals"][signal.name] = _auroc(-np.log10(p), positive)
    return out


def run_corpus(kind: str, case: Case, detector: Path, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """One corpus ("poison-0.01", "near-duplicates") from images to the default rule's cut and every variant."""
    shutil.rmtree(work, ignore_errors=True)
    src, shards, scores, near = (work / n for n in ("src", "shards", "scores", "neighbours"))
    if kind == "near-duplicates":
        info: dict[str, Any] = {"groups": write_near_duplicates(case, src)}
    else:
        info = {"rate": float(kind.split("-")[1])}
        info["planted"] = write_poisoned(case, info["rate"], src)
    write_shards(str(src), str(shards), progress=False)
    score_shards(str(shards), detector=str(detector), out_dir=str(scores), workers=0, progress=False,
                 reuse_detector=True)
    neighbours(str(scores), str(near), progress=False)
    sel = select(str(scores))  # the product's default rule, exactly as `dede clean` takes it
    keys = sel.verdict.table.column("key").to_pylist()
    poison = {k for k in keys if POISON_MARK in k}
    result = info | {"default_rule": _cut_figures(set(sel.dropped.column("key").to_pylist()), poison, len(keys)),
                     "summary": {k: sel.verdict.summary[k] for k in ("flagged", "estimated_poisoned", "combined")}}
    old = select(str(scores), Rule.fpr(0.05))
    result["fpr_0.05"] = _cut_figures(set(old.dropped.column("key").to_pylist()), poison, len(keys))
    conn = connect(str(scores))
    try:
        from dede_core.signals.gather import calibration_frame

        calibration = calibration_frame(conn)
    finally:
        conn.close()
    result |= judge(_frame(scores, near), calibration)
    v = result["variants"][next(iter(VARIANTS))]
    log(f"{kind}: {result['poisoned']} poisoned of {result['samples']}; default cut flags {v['flagged']} "
        f"(precision {v['precision']}, recall {v['recall']}, clean lost {v['clean_lost']}); AUROC {v['auroc']}")
    return result


CORPORA = tuple(f"poison-{rate:g}" for rate in RATES) + ("near-duplicates",)


def run_case(name: str, case: Case, detector: Path, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    return {"case": name, **dataclasses.asdict(case),
            "corpora": {kind: run_corpus(kind, case, detector, work / name / kind, log) for kind in CORPORA}}
