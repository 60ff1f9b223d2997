"""The verdict's statistics: p-values under a bulk-fitted null, their combination and the Benjamini-Hochberg cut."""

from __future__ import annotations

import numpy as np
import pytest

from dede_core.signals import SIGNALS, Signal, register
from dede_core.signals.stats import Null, bh_q_values, bonferroni_min, cauchy_combination, fit_null, on_scale, p_values
from dede_core.signals.verdict import VerdictConfig, decide, describe


def test_bh_q_values_match_the_step_up_procedure():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-4, size=20)])
    q = bh_q_values(p)
    order = np.sort(p)
    passed = [k for k in range(1, len(p) + 1) if order[k - 1] <= 0.05 * k / len(p)]
    assert (q <= 0.05).sum() == max(passed)  # rejecting q <= alpha is Benjamini-Hochberg at alpha
    assert np.isnan(bh_q_values(np.array([np.nan, 0.5]))[0])


@pytest.mark.parametrize("combine", [cauchy_combination, bonferroni_min])
def test_combined_p_values_keep_their_tail_under_dependent_nulls(combine):
    rng = np.random.default_rng(1)
    shared = rng.normal(size=200_000)
    z = np.stack([shared, 0.8 * shared + 0.6 * rng.normal(size=200_000), rng.normal(size=200_000)], axis=1)
    p = p_values(z, Null(0.0, 1.0, 1), "upper")  # three standard-normal signals, two of them correlated 0.8
    combined = combine(p)
    for level in (1e-2, 1e-3):
        assert (combined <= level).mean() <= 1.3 * level  # valid (a little conservative) in the tail


def test_a_signal_that_sees_nothing_does_not_cancel_another_one():
    p = np.array([[1e-6, 1 - 1e-12]])
    assert cauchy_combination(p)[0] < 1e-5  # capped at 0.5, the second adds nothing instead of -1e12
    assert cauchy_combination(p, np.array([2.0, 1.0]))[0] < cauchy_combination(p)[0]


def test_the_bulk_null_ignores_a_few_percent_of_outliers():
    rng = np.random.default_rng(2)
    values = on_scale(np.exp(rng.normal(3, 0.5, 1000)), "log")
    values[:30] += 10
    null = fit_null(values)
    assert abs(null.center - 3) < 0.1 and abs(null.spread - 0.5) < 0.06
    p = p_values(values, null, "upper")
    assert (p[:30] < 1e-10).all() and np.isnan(p_values(np.array([np.nan]), null, "upper")[0])


def test_decide_flags_what_any_signal_finds_and_says_so():
    rng = np.random.default_rng(3)
    n = 1500
    frame = {"key": np.array([f"k{i}" for i in range(n)]), "shard": np.array(["000000.tar"] * n),
             "score": np.exp(rng.normal(0, 0.2, n)), "recon_error": np.exp(rng.normal(0, 0.2, n)),
             "knn_score": np.exp(rng.normal(0, 0.2, n)), "collapse": np.exp(rng.normal(0, 0.2, n)),
             "kdist_distinct": np.exp(rng.normal(0, 0.2, n)), "dao": np.exp(rng.normal(0, 0.2, n))}
    frame["knn_score"][:15] *= 5  # far from the auxiliary images
    frame["score"][30:45] *= 5  # the decoder sees these, but dede is shown, not combined
    frame["collapse"][15:30] *= 5  # the corpus' neighbourhoods see these
    verdict = decide(frame)
    flagged = set(np.flatnonzero(verdict.table.column("verdict").to_numpy(zero_copy_only=False)))
    assert set(range(30)) <= flagged and len(flagged) <= 32
    summary = verdict.summary
    assert set(summary["combined"]) == {"aux_distance", "collapse"}
    assert summary["signals"]["collapse"]["weight"] == 2.0 and summary["signals"]["dede"]["weight"] == 0.0
    assert summary["signals"]["dede"]["extreme"] >= 15 and summary["expected_precision"] == 0.95
    assert any("flags" in line for line in describe(summary))
    quiet = decide({k: (v if k in ("key", "shard") else np.exp(rng.normal(0, 0.2, n))) for k, v in frame.items()})
    assert quiet.summary["flagged"] == 0 and "no sample is flagged" in describe(quiet.summary)[-1]


def test_a_signal_is_one_registration():
    signal = register(Signal(name="test_only", table="scores", column="density_score", tail="upper",
                             scale="log", in_verdict=False, about="a test signal"))
    try:
        assert SIGNALS["test_only"] is signal and signal.p_column == "p_test_only"
        with pytest.raises(ValueError, match="a different signal"):
            register(Signal(name="test_only", table="scores", column="score", tail="upper", scale="log",
                            in_verdict=False, about="another"))
        with pytest.raises(ValueError, match="tail must be one of"):
            Signal(name="x", table="scores", column="score", tail="sideways", scale="log", in_verdict=False, about="")
        with pytest.raises(ValueError, match="unknown signals"):
            VerdictConfig(signals=("nope",))
    finally:
        SIGNALS.pop("test_only")
