"""Embedding-space baselines on synthetic embeddings: a clean Gaussian cloud plus a triggered cluster. The k-NN
baseline is the shipped knn_distance (dede_core.detector.knn), as the benchmark calls it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.baselines import bank_knn_distance, slof, spectral_signature
from bench.metrics import auroc
from dede_core.detector.knn import knn_distance

D = 16


@pytest.fixture(scope="module")
def cloud():
    """bank (300 clean), held-out clean (100), triggered (40: collapsed near one far point, as a backdoor does)."""
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, D))
    heldout = rng.normal(size=(100, D))
    target = np.full(D, 2.0)  # ~8 units from the cloud centre, while clean points sit ~4 from it
    triggered = target + 0.01 * rng.normal(size=(40, D))
    return bank, heldout, triggered


def shipped_knn(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The benchmark's k-NN row: the shipped knn_score of the queries against the bank."""
    return knn_distance(torch.from_numpy(queries), torch.from_numpy(bank), k).double().numpy()


@pytest.mark.parametrize("detector", [shipped_knn, slof])
def test_density_detectors_flag_the_triggered_cluster(cloud, detector):
    bank, heldout, triggered = cloud
    clean_scores, trig_scores = detector(bank, heldout, k=5), detector(bank, triggered, k=5)
    assert clean_scores.shape == (100,) and trig_scores.shape == (40,) and clean_scores.dtype == np.float64
    assert auroc(clean_scores, trig_scores) > 0.95


def test_shipped_knn_matches_brute_force(cloud):
    bank, heldout, _ = cloud
    brute = np.sort(np.linalg.norm(heldout[:, None] - bank[None], axis=2), axis=1)[:, 2]
    np.testing.assert_allclose(shipped_knn(bank, heldout, k=3), brute, rtol=1e-5)


def test_bank_knn_distance_skips_only_the_own_row(cloud):
    bank = cloud[0][:50]
    brute = np.linalg.norm(bank[:, None] - bank[None], axis=2)
    np.fill_diagonal(brute, np.inf)
    for k in (1, 3, 49):
        np.testing.assert_allclose(bank_knn_distance(bank, k), np.sort(brute, axis=1)[:, k - 1], rtol=1e-5)
    np.testing.assert_allclose(bank_knn_distance(torch.from_numpy(bank).float(), 3), bank_knn_distance(bank, 3),
                               rtol=1e-6)
    dup = np.vstack([bank, bank[:1]])  # an exact duplicate is a real neighbour at distance 0
    assert bank_knn_distance(dup, 1)[0] < 1e-3 < bank_knn_distance(bank, 1)[0]
    assert np.all(np.isfinite(slof(bank, bank, k=3, exclude_self=True)))


def test_slof_is_about_one_inside_a_uniform_cloud():
    grid = np.stack(np.meshgrid(np.arange(12.0), np.arange(12.0)), -1).reshape(-1, 2)
    inner = (grid.min(1) >= 2) & (grid.max(1) <= 9)  # away from the edge, where density drops
    assert np.allclose(slof(grid, grid, k=4, exclude_self=True)[inner], 1.0)
    assert slof(grid, np.array([[30.0, 30.0]]), k=4)[0] > 10


def test_spectral_signature_finds_the_shifted_direction():
    rng = np.random.default_rng(3)
    centres = 25.0 * np.eye(4, D)  # four well-separated clusters
    x = np.concatenate([c + rng.normal(size=(150, D)) for c in centres])
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    poisoned = rng.choice(150, 8, replace=False)  # ~5% of cluster 0
    x[poisoned] += 8.0 * direction
    scores = spectral_signature(x, clusters=4, seed=0)
    is_poisoned = np.zeros(len(x), dtype=bool)
    is_poisoned[poisoned] = True
    assert scores.shape == (600,) and auroc(scores[~is_poisoned], scores[is_poisoned]) > 0.9
    np.testing.assert_array_equal(scores, spectral_signature(x, clusters=4, seed=0))  # seeded


@pytest.mark.parametrize("call, match", [
    (lambda b, q: slof(b[0], q), "2-D"),
    (lambda b, q: slof(b, q[:, :3]), "width D"),
    (lambda b, q: slof(b[:5], q, k=2, exclude_self=True), "exclude_self"),
    (lambda b, q: slof(b[:5], q, k=5), r"k must be .* \[1, 4\]"),
    (lambda b, q: bank_knn_distance(b[:5], 5), r"\[1, 4\]"),
    (lambda b, q: bank_knn_distance(b[:5], 0), r"\[1, 4\]"),
    (lambda b, q: bank_knn_distance(np.full((3, D), np.nan), 1), "NaN"),
    (lambda b, q: spectral_signature(b[:5], clusters=6), "clusters"),
    (lambda b, q: spectral_signature(np.zeros((0, D))), "empty"),
])
def test_shape_and_argument_errors(cloud, call, match):
    bank, heldout, _ = cloud
    with pytest.raises(ValueError, match=match):
        call(bank, heldout)
