"""The verdict suite (issue #20): each generalization case's detector judged on realistic corpora through the
shipped stages (shard -> score -> neighbours -> select with the default rule), defaults only.

Per case (a victim and an auxiliary set) the corpora are clean test images with 0%, 0.1%, 1% and 5% of
triggered images added (triggered copies of other test images, never of a corpus image), and a clean corpus
in which near-duplicate groups (one picture re-encoded as JPEG at several qualities and resized) of 2-50
members make up 5%. `prepare` builds the victims and detectors first (the long part, cached and resumable).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from typing import Any

from bench.cases import CASES, VICTIMS, SuiteConfig, aux_images
from bench.common import config_digest
from bench.generalization import _detector, build_victim, evaluate_victim
from bench.report import Log, run_report, stderr_log
from bench.verdict_report import render_verdict
from dede_core.detector.checkpoint import load_checkpoint
from dede_core.detector.scorer import ScoreConfig
from dede_core.detector.train import TrainConfig
from dede_core.stages.neighbours import NeighboursSettings

# Tuning cases first (the verdict's design was judged on these), then the held-out ones.
TUNING = ("sticker64-photos", "sticker64-photos-clean-aux", "sticker64-photos-ood-aux")
HELD_OUT = ("sig64-photos-clean-aux", "sig64-photos", "sig64-photos-ood-aux", "blend96-photos",
            "blend96-photos-clean-aux", "sticker64-photos-aux5%", "sticker64-photos-aux0.5%", "sticker64-fashion")


def prepare(cases: tuple[str, ...], suite: SuiteConfig, cache: Path, log: Log = stderr_log) -> dict[str, dict]:
    """Build (or reuse) every case's victim and default detector, in order; returns each victim's metrics."""
    metrics: dict[str, dict] = {}
    for name in cases:
        case = CASES[name]
        t0 = time.perf_counter()
        spec = build_victim(case.victim, suite, cache, log)
        if case.victim not in metrics:
            metrics[case.victim] = evaluate_victim(case.victim, spec, suite)
            log(f"{case.victim}: {metrics[case.victim]}")
        if metrics[case.victim]["attack_success_rate"] < suite.min_asr:
            log(f"{name}: the attack does not work (ASR below {suite.min_asr}); no detector")
            continue
        _detector(cache, f"gen-{name}", aux_images(case, suite), spec, suite, log)  # trained once, then reused
        log(f"{name}: victim and detector ready ({time.perf_counter() - t0:.0f} s)")
    return metrics


RESULT_VERSION = 4  # raise when what a case computes changes beyond its detector and the corpora


def evaluate(cases: tuple[str, ...], suite: SuiteConfig, cache: Path, out_dir: Path, work: Path,
             log: Log = stderr_log, name: str = "verdict") -> dict[str, Any]:
    """Each case's corpora through the stages (cached per case by its detector and the suite's settings);
    OUT/<name>.md and .json rewritten after each case."""
    from bench.verdict_eval import CORPORA, VARIANTS, run_case

    def compute(case_name: str) -> dict[str, Any]:
        case = CASES[case_name]
        spec = build_victim(case.victim, suite, cache, log)
        metrics = evaluate_victim(case.victim, spec, suite)
        if metrics["attack_success_rate"] < suite.min_asr:
            return {"case": case_name, "victim_metrics": metrics, "works": False}
        path, config, note = _detector(cache, f"gen-{case_name}", aux_images(case, suite), spec, suite, log)
        health = load_checkpoint(path).meta.get("health") or {}
        return run_case(case_name, case, path, work, log) | {
            "victim_metrics": metrics, "works": True, "detector": note, "victim": case.victim,
            "trigger": VICTIMS[case.victim].trigger, "reliance": health.get("embedding_reliance")}

    def stored(case_name: str) -> Path:
        case = CASES[case_name]
        digest = config_digest(RESULT_VERSION, dataclasses.asdict(case), dataclasses.asdict(VICTIMS[case.victim]),
                               {k: v for k, v in dataclasses.asdict(suite).items() if k != "cases"},
                               CORPORA, sorted(VARIANTS), dataclasses.asdict(TrainConfig()),
                               dataclasses.asdict(ScoreConfig()), dataclasses.asdict(NeighboursSettings()))
        return cache / "results" / f"verdict-{case_name}-{digest}.json"

    return run_report(cases, config=dataclasses.asdict(suite), out_dir=out_dir, name=name, stored=stored,
                      compute=compute, title=lambda case, result: case, render=render_verdict, log=log)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the verdict suite: prepare victims and detectors, then judge "
                                     "each case's realistic corpora with the default rule")
    parser.add_argument("step", choices=["prepare", "evaluate"])
    parser.add_argument("--cases", default=",".join(TUNING + HELD_OUT))
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--work", default="/tmp/dede-verdict")
    args = parser.parse_args()
    chosen = tuple(args.cases.split(","))
    suite = SuiteConfig(cases=chosen)
    if args.step == "prepare":
        prepare(chosen, suite, Path(args.cache))
    else:
        evaluate(chosen, suite, Path(args.cache), Path(args.out), Path(args.work))
