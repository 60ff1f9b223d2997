"""Detection metrics: higher score = more suspicious, positives = triggered samples, negatives = clean ones.

Everything here is plain numpy so that reports and baselines share one definition of AUROC and TPR at a fixed
FPR. The label-free threshold is the product's own (dede_core.stages.select.fpr_threshold, what `dede clean --fpr`
takes). A sample is flagged when its score is strictly above a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike


def _scores(name: str, values: ArrayLike) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores (one per sample), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: at least one score is needed")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains {int(np.isnan(arr).sum())} NaN score(s); drop unscored samples first")
    return arr


def _fraction(name: str, value: float, *, allow_zero: bool = False) -> float:
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not numeric or not ((value >= 0 if allow_zero else value > 0) and value < 1):
        bound = "in [0, 1)" if allow_zero else "strictly between 0 and 1"
        raise ValueError(f"{name} must be a number {bound} (e.g. 0.05), got {value!r}")
    return float(value)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing the mean of their ranks (scipy.stats.rankdata 'average')."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Starts of runs of equal values; each run gets the mean of its 1-based positions.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def auroc(scores_neg: ArrayLike, scores_pos: ArrayLike) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie): the Mann-Whitney U statistic over n_neg * n_pos."""
    neg, pos = _scores("scores_neg", scores_neg), _scores("scores_pos", scores_pos)
    ranks = _average_ranks(np.concatenate([neg, pos]))
    u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


def roc_curve(scores_neg: ArrayLike, scores_pos: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0) to (1, 1), one point per distinct score (flagged = score >= that value).

    Tied scores move both rates in one step, so the trapezoidal area under the curve equals auroc().
    """
    neg, pos = _scores("scores_neg", scores_neg), _scores("scores_pos", scores_pos)
    scores = np.concatenate([neg, pos])
    is_pos = np.r_[np.zeros(neg.size), np.ones(pos.size)]
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last_of_run = np.r_[scores[1:] != scores[:-1], True]
    tp = np.cumsum(is_pos)[last_of_run]
    fp = np.cumsum(1 - is_pos)[last_of_run]
    return np.r_[0.0, fp / neg.size], np.r_[0.0, tp / pos.size]


def tpr_at_fpr(scores_neg: ArrayLike, scores_pos: ArrayLike, fpr: float) -> float:
    """Fraction of positives strictly above the smallest threshold that leaves at most `fpr` of negatives above.

    That threshold is the order statistic neg_sorted[n - 1 - floor(fpr * n)] (numpy's 'inverted_cdf'
    quantile at 1 - fpr), so the realised FPR never exceeds `fpr`; with ties at the threshold it is lower.
    This is an oracle figure (it reads the negatives' scores); deployment takes select.fpr_threshold().
    """
    neg, pos = _scores("scores_neg", scores_neg), _scores("scores_pos", scores_pos)
    fpr = _fraction("fpr", fpr, allow_zero=True)
    # Integer arithmetic with a small tolerance: fpr * n = 5.000000000000001 must allow 5, not 4.
    allowed = min(int(math.floor(fpr * neg.size + 1e-9)), neg.size - 1)
    threshold = np.sort(neg)[neg.size - 1 - allowed]
    return float(np.mean(pos > threshold))


def rates_at_threshold(scores_neg: ArrayLike, scores_pos: ArrayLike, threshold: float) -> dict[str, float]:
    """{'fpr', 'tpr'}: fractions of negatives and positives strictly above `threshold` (flagged)."""
    neg, pos = _scores("scores_neg", scores_neg), _scores("scores_pos", scores_pos)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
            or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (e.g. from select.fpr_threshold), got {threshold!r}")
    return {"fpr": float(np.mean(neg > threshold)), "tpr": float(np.mean(pos > threshold))}


def rank_average(*score_arrays: ArrayLike) -> np.ndarray:
    """Combine detectors scored on the same N samples: mean of their ranks scaled to 0..1 (ties averaged).

    Ranks, not raw scores, because detectors live on unrelated scales (a squared pixel error, a distance).
    """
    if not score_arrays:
        raise ValueError("rank_average needs at least one score array")
    arrays = [_scores(f"score_arrays[{i}]", a) for i, a in enumerate(score_arrays)]
    sizes = {a.size for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"all score arrays must cover the same samples in the same order; got sizes "
                         f"{[a.size for a in arrays]}")
    n = arrays[0].size
    if n == 1:
        return np.full(1, 0.5)
    return np.mean([(_average_ranks(a) - 1.0) / (n - 1) for a in arrays], axis=0)


def precision_recall(flagged_keys: Iterable[str], planted_keys: Iterable[str]) -> dict[str, float | int | None]:
    """Precision and recall of the flagged sample keys against the planted (triggered) ones.

    Keys are compared as sets. precision is None when nothing was flagged, recall None when nothing was
    planted: undefined rather than a made-up 0 or 1 that would slip into averages.
    """
    for name, keys in (("flagged_keys", flagged_keys), ("planted_keys", planted_keys)):
        if isinstance(keys, (str, bytes)):
            raise ValueError(f"{name} must be a collection of keys, not a single string {keys!r}")
    flagged, planted = set(flagged_keys), set(planted_keys)
    tp = len(flagged & planted)
    return {"precision": tp / len(flagged) if flagged else None,
            "recall": tp / len(planted) if planted else None,
            "flagged": len(flagged), "planted": len(planted), "true_positives": tp}


def plot_roc(curves: Mapping[str, tuple[ArrayLike, ArrayLike, float]], path: str | Path,
             title: str = "ROC") -> Path:
    """Write one PNG with a ROC curve per detector, {name: (fpr, tpr, auroc)}; the legend shows the AUROC."""
    if not curves:
        raise ValueError("curves is empty: pass {name: (fpr, tpr, auroc)} for at least one detector")
    # Figure + the Agg canvas directly: no pyplot global state, no GUI backend, safe in worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (fpr, tpr, auc) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(f"curve {name!r}: fpr and tpr must be 1-D arrays of one length, "
                             f"got shapes {fpr.shape} and {tpr.shape}")
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (clean flagged)",
           ylabel="true-positive rate (triggered flagged)", title=title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
