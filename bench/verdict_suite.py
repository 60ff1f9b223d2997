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

from bench.cases import CASES, VICTIMS, SuiteConfig, aux_images
from bench.generalization import _detector, build_victim, evaluate_victim
from bench.report import Log, stderr_log

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
        _detector(cache, f"gen-{name}", aux_images(case, suite), spec, suite, log)
        log(f"{name}: victim and detector ready ({time.perf_counter() - t0:.0f} s)")
    return metrics


if __name__ == "__main__":
    import sys

    chosen = tuple(sys.argv[1].split(",")) if len(sys.argv) > 1 else TUNING + HELD_OUT
    prepare(chosen, SuiteConfig(cases=chosen), Path("/work/cache"))
