"""Detection metrics: AUROC against sklearn, oracle and label-free thresholds, rank fusion, plotting."""

from __future__ import annotations

import numpy as np
import pytest

from bench.metrics import (auroc, plot_roc, precision_recall, rank_average, rates_at_threshold, roc_curve,
                           tpr_at_fpr)
from dede_core.stages.select import fpr_threshold


def test_auroc_extremes():
    assert auroc([0, 1, 2], [5, 6]) == 1.0
    assert auroc([5, 6], [0, 1, 2]) == 0.0
    assert auroc([3, 3, 3], [3, 3]) == 0.5
    assert auroc([1, 2], [2, 3]) == pytest.approx(0.875)  # one tie out of four pairs counts half


def test_auroc_matches_sklearn_with_ties_and_trapezoid_roc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    neg, pos = rng.integers(0, 20, 300).astype(float), rng.integers(5, 25, 200).astype(float)
    expected = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[neg, pos])
    assert auroc(neg, pos) == pytest.approx(expected, abs=1e-12)
    fpr, tpr = roc_curve(neg, pos)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected, abs=1e-12)


def test_auroc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="empty"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        auroc([1.0, np.nan], [2.0])
    with pytest.raises(ValueError, match="1-D"):
        auroc(np.zeros((2, 2)), [1.0])


def test_tpr_at_fpr_hand_built():
    neg = np.arange(10.0)  # 0..9
    pos = np.array([7.5, 8.5, 9.5, 10.0])
    # fpr 0.1: one negative (9) may sit above, so the threshold is 8; positives above 8: 8.5, 9.5, 10.
    assert tpr_at_fpr(neg, pos, 0.1) == 0.75
    # fpr 0.2: threshold 7 -> all four positives are above.
    assert tpr_at_fpr(neg, pos, 0.2) == 1.0
    # fpr 0: threshold is the largest negative (9); fpr 0.05 allows floor(0.5) = 0 negatives too.
    assert tpr_at_fpr(neg, pos, 0.0) == tpr_at_fpr(neg, pos, 0.05) == 0.5
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(neg, pos, 1.0)


def test_label_free_threshold_hits_target_fpr_on_fresh_samples():
    """The product's --fpr threshold, taken on held-out samples, holds the FPR on fresh ones (what table rows say)."""
    rng = np.random.default_rng(1)
    threshold = fpr_threshold(rng.normal(size=20_000), 0.05)
    observed = rates_at_threshold(rng.normal(size=20_000), rng.normal(3, 1, 1000), threshold)
    assert 0.04 <= observed["fpr"] <= 0.06 and observed["tpr"] > 0.5


def test_rates_at_threshold_counts_strictly_above():
    assert rates_at_threshold([1, 2, 3, 4], [3, 5], 3) == {"fpr": 0.25, "tpr": 0.5}
    with pytest.raises(ValueError, match="threshold"):
        rates_at_threshold([1], [2], float("nan"))


def test_rank_average_lifts_a_random_detector():
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(200), np.ones(50)].astype(bool)
    perfect, noise = labels.astype(float), rng.normal(size=labels.size)
    fused = rank_average(perfect, noise)
    assert fused.shape == labels.shape and fused.min() >= 0 and fused.max() <= 1
    assert auroc(fused[~labels], fused[labels]) > auroc(noise[~labels], noise[labels])
    assert auroc(fused[~labels], fused[labels]) > 0.8  # half the weight is noise, so not 1.0
    np.testing.assert_allclose(rank_average([3.0, 1.0, 2.0]), [1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="same samples"):
        rank_average([1, 2], [1, 2, 3])


def test_precision_recall():
    got = precision_recall(["a", "b", "c", "c"], ["b", "c", "d", "e"])
    assert got == {"precision": 2 / 3, "recall": 0.5, "flagged": 3, "planted": 4, "true_positives": 2}
    assert precision_recall([], ["x"])["precision"] is None
    with pytest.raises(ValueError, match="collection"):
        precision_recall("abc", ["a"])


def test_plot_roc_writes_png(tmp_path):
    neg, pos = np.arange(10.0), np.arange(5.0, 15.0)
    fpr, tpr = roc_curve(neg, pos)
    path = plot_roc({"dede": (fpr, tpr, auroc(neg, pos))}, tmp_path / "sub" / "roc.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
