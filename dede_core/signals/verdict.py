"""One verdict per sample: every available signal as a p-value under a label-free null, the p-values combined
into one that stays valid when the signals are dependent, and Benjamini-Hochberg over the combined p-values.

Null: a normal on the signal's scale (log for the positive ones) fitted by median and MAD to the corpus' own
scored samples ("bulk"). A few percent of poison barely moves a median, the corpus is what the auxiliary
images may not be (out of distribution, or carrying triggers themselves), and with no poison the bulk is the
whole corpus. "calibration" fits the scores-table signals to the detector's held-out auxiliary images instead
(docs/results/generalization.md measures both).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dede_core.signals.registry import SIGNALS, Signal, signals
from dede_core.signals.stats import (bh_q_values, bonferroni_min, cauchy_combination, fit_null, on_scale, p_values)

NULLS = ("bulk", "calibration")
COMBINATIONS = ("cauchy", "bonferroni")


@dataclass(frozen=True)
class VerdictConfig:
    """How the verdict is reached (part of a clean folder's identity)."""

    fdr: float = 0.05  # Benjamini-Hochberg level over the combined p-values
    null: str = "bulk"  # where each signal's null is fitted: the corpus' bulk, or the held-out calibration images
    combine: str = "cauchy"  # cauchy (Liu & Xie, each signal's weight) | bonferroni (m x min p): both valid
    equal: bool = False  # cauchy with equal weights instead of the signals' own (a design measured beside)
    signals: tuple[str, ...] | None = None  # the signals combined; None: every registered one marked in_verdict

    def __post_init__(self) -> None:
        if isinstance(self.fdr, bool) or not isinstance(self.fdr, (int, float)) or not 0 < self.fdr < 1:
            raise ValueError(f"fdr must be a number strictly between 0 and 1 (e.g. 0.05), got {self.fdr!r}")
        if self.null not in NULLS or self.combine not in COMBINATIONS:
            raise ValueError(f"null must be one of {NULLS} and combine one of {COMBINATIONS}, got "
                             f"{self.null!r}, {self.combine!r}")
        unknown = [s for s in self.signals or () if s not in SIGNALS]
        if unknown:
            raise ValueError(f"unknown signals {unknown}; registered: {', '.join(SIGNALS)}")

    def combined(self) -> list[Signal]:
        return [SIGNALS[s] for s in self.signals] if self.signals else [s for s in signals() if s.in_verdict]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Verdict:
    """Per-sample p-values and the cut, and what each signal found."""

    table: pa.Table  # key, shard, p_<signal> for each available signal, p_combined, q_value, verdict
    summary: dict[str, Any]


def decide(frame: dict[str, np.ndarray], config: VerdictConfig = VerdictConfig(),
           calibration: dict[str, np.ndarray] | None = None) -> Verdict:
    """frame: key, shard and each signal's column for the scored samples (a neighbours column may be absent);
    calibration: the held-out images' scores-table columns, for null="calibration"."""
    n = len(frame["key"])
    columns: dict[str, Any] = {"key": pa.array(frame["key"], pa.string()), "shard": pa.array(frame["shard"], pa.string())}
    found: dict[str, Any] = {}
    used, weights = [], []
    combined_signals = config.combined()
    for signal in signals():
        if signal.column not in frame:
            found[signal.name] = {"available": False, "in_verdict": False, "about": signal.about}
            continue
        values = on_scale(frame[signal.column], signal.scale)
        reference = values
        if config.null == "calibration" and signal.table == "scores" and calibration and signal.column in calibration:
            reference = on_scale(calibration[signal.column], signal.scale)
        null = fit_null(reference)
        p = p_values(values, null, signal.tail)
        columns[signal.p_column] = pa.array(p, pa.float64(), from_pandas=True)
        counted = signal in combined_signals
        weight = (1.0 if config.equal else signal.weight) if counted else 0.0
        if counted and null.n > 0:
            used.append(p)
            weights.append(weight)
        found[signal.name] = {"available": True, "in_verdict": counted, "about": signal.about, "null": null.to_dict(),
                              "weight": weight,
                              "column": signal.column, "tail": signal.tail,
                              # Bonferroni over the corpus: a sample no null of this shape explains
                              "extreme": int(np.sum(p <= config.fdr / max(n, 1))),
                              "min_p": float(np.nanmin(p)) if np.isfinite(p).any() else None}
    stacked = np.stack(used, axis=1) if used else np.full((n, 1), np.nan)
    combined = (cauchy_combination(stacked, np.array(weights) if weights else None) if config.combine == "cauchy"
                else bonferroni_min(stacked))
    q = bh_q_values(combined)
    verdict = np.where(np.isfinite(q), q <= config.fdr, False)
    columns |= {"p_combined": pa.array(combined, pa.float64(), from_pandas=True),
                "q_value": pa.array(q, pa.float64(), from_pandas=True), "verdict": pa.array(verdict, pa.bool_())}
    flagged = int(verdict.sum())
    summary = {"config": config.to_dict(), "samples": n, "signals": found, "flagged": flagged,
               # BH keeps the expected share of clean samples among the flagged at or below fdr
               "expected_precision": (1 - config.fdr) if flagged else None,
               "estimated_poisoned": round(flagged * (1 - config.fdr), 1),
               "combined": [s.name for s in combined_signals if found.get(s.name, {}).get("available")]}
    return Verdict(pa.table(columns), summary)


def describe(summary: dict[str, Any]) -> list[str]:
    """Plain lines for a person: what each signal found and what the cut removes."""
    lines = []
    for name, found in summary["signals"].items():
        if not found["available"]:
            lines.append(f"{name}: not available ({found['about']})")
            continue
        role = "in the verdict" if found["in_verdict"] else "shown only"
        lines.append(f"{name} ({role}): {found['extreme']} sample(s) no bulk-fitted null explains "
                     f"({found['about']})")
    fdr = summary["config"]["fdr"]
    if summary["flagged"]:
        lines.append(f"the cut (Benjamini-Hochberg, fdr {fdr:g}) flags {summary['flagged']} of {summary['samples']} "
                     f"samples: it believes at least {summary['estimated_poisoned']:.0f} of them poisoned (expected "
                     f"precision >= {1 - fdr:.2f})")
    else:
        lines.append(f"no signal found anything the cut would remove (fdr {fdr:g}): no sample is flagged")
    return lines
