"""The statistics of the verdict: a label-free null per signal, p-values, their combination, and the
Benjamini-Hochberg cut. Plain numpy over one float per sample (a million samples are a few MB)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MAD_TO_SD = 1.4826  # the MAD of a normal distribution is 0.6745 of its standard deviation


@dataclass(frozen=True)
class Null:
    """A normal null on the signal's scale, fitted robustly (median, MAD) to reference values."""

    center: float
    spread: float
    n: int  # finite reference values it was fitted on

    def to_dict(self) -> dict[str, float]:
        return {"center": self.center, "spread": self.spread, "n": self.n}


def on_scale(values: np.ndarray, scale: str) -> np.ndarray:
    """Values on the scale their null is normal on (log for positive, skewed signals); NaN stays NaN."""
    values = np.asarray(values, dtype=np.float64)
    if scale == "log":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(np.where(values > 0, values, np.nan))
    return values


def fit_null(reference: np.ndarray) -> Null:
    """Median and MAD of the finite reference values: a few percent of outliers (the poison) barely move them."""
    finite = reference[np.isfinite(reference)]
    if finite.size == 0:
        return Null(math.nan, math.nan, 0)
    center = float(np.median(finite))
    spread = MAD_TO_SD * float(np.median(np.abs(finite - center)))
    return Null(center, max(spread, 1e-12), int(finite.size))


def p_values(values: np.ndarray, null: Null, tail: str) -> np.ndarray:
    """One-sided normal tail probabilities of `values` (already on the null's scale); NaN where a value is."""
    z = (values - null.center) / null.spread
    if tail == "lower":
        z = -z
    with np.errstate(invalid="ignore"):
        p = 0.5 * torch.special.erfc(torch.from_numpy(z / math.sqrt(2.0))).numpy()
    return np.where(np.isfinite(z), p, np.nan)


def cauchy_combination(p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(N, m) p-values -> (N,): the Cauchy combination test (Liu & Xie 2020), `weights` (m,) (default equal)
    normalised over each row's available (non-NaN) p-values. Its tail stays valid under arbitrary dependence between the signals, which
    these have (they read the same embedding). NaN where a row has none.

    Each p-value is capped at 0.5 first: a signal that sees nothing (p near 1, e.g. a triggered image right
    beside the auxiliary set's triggered images) then adds nothing instead of a huge negative term that cancels
    another signal's evidence. The cap only raises the statistic where it is below the tail, so the tail
    probabilities, and with them the validity of the small combined p-values, are those of the test itself."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-300, 0.5)
    available = np.isfinite(p)
    # tan((0.5 - p) pi) = 1 / tan(p pi), which keeps its precision for tiny p
    t = np.where(available, 1.0 / np.tan(np.where(available, p, 0.5) * np.pi), 0.0)
    w = np.ones(p.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    count = available.sum(axis=1)
    total = (available * w).sum(axis=1)
    stat = (t * w).sum(axis=1) / np.where(total > 0, total, 1.0)
    combined = np.where(stat > 1e15, 1.0 / (np.maximum(stat, 1e-300) * np.pi), 0.5 - np.arctan(stat) / np.pi)
    return np.where(count > 0, np.clip(combined, 0.0, 1.0), np.nan)


def bonferroni_min(p: np.ndarray) -> np.ndarray:
    """(N, m) -> (N,): m times the smallest available p-value, capped at 1: valid under any dependence."""
    p = np.asarray(p, dtype=np.float64)
    available = np.isfinite(p)
    count = available.sum(axis=1)
    smallest = np.where(available, p, np.inf).min(axis=1)
    return np.where(count > 0, np.minimum(1.0, smallest * count), np.nan)


def bh_q_values(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values): rejecting q <= alpha controls the false discovery rate at
    alpha (independent or positively dependent tests). NaN entries are left out and stay NaN."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if finite.size == 0:
        return q
    order = finite[np.argsort(p[finite], kind="stable")]
    ranked = p[order] * finite.size / np.arange(1, finite.size + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q

