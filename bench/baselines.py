"""Embedding-space detectors a user would pick instead of DeDe, on embeddings of the frozen victim encoder.

All take (N, D) float tensors or numpy arrays and return one float64 numpy score per query, higher = more
suspicious, so they plug into bench.metrics unchanged.
- k-NN distance: the shipped `knn_score` (dede_core.detector.knn.knn_distance) against a reference bank;
  bank_knn_distance gives the bank's own rows the same score, for a label-free threshold.
- slof: simplified local outlier factor against the same bank (density relative to the neighbours').
- spectral_signature: Tran et al.'s spectral signatures with k-means pseudo-labels instead of class labels.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike

from dede_core.detector.knn import knn_distance

Embeddings = torch.Tensor | ArrayLike


def _embeddings(name: str, x: Embeddings) -> torch.Tensor:
    """(N, D) float64 CPU tensor; float64 so that distances between near-duplicates do not round to noise."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{name} must hold real numbers, got numpy dtype {arr.dtype}")
        t = torch.from_numpy(arr)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array of embeddings, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): at least one D>0 embedding is needed")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values; drop the samples that failed to embed first")
    return t


def _pair(bank: Embeddings, queries: Embeddings, k: int, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    bank_t, query_t = _embeddings("bank", bank), _embeddings("queries", queries)
    if bank_t.shape[1] != query_t.shape[1]:
        raise ValueError(f"bank and queries must share the embedding width D; got bank D={bank_t.shape[1]}, "
                         f"queries D={query_t.shape[1]} (were they embedded by the same encoder?)")
    if exclude_self and bank_t.shape != query_t.shape:
        raise ValueError("exclude_self=True means queries are the bank itself (row i of queries is row i of the "
                         f"bank), but shapes differ: bank {tuple(bank_t.shape)}, queries {tuple(query_t.shape)}")
    _check_k(k, bank_t.shape[0], exclude_self)
    return bank_t, query_t


def _check_k(k: int, bank_size: int, exclude_self: bool) -> None:
    available = bank_size - 1 if exclude_self else bank_size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        extra = " (one fewer than the bank size, since each point skips itself)" if exclude_self else ""
        raise ValueError(f"k must be an integer in [1, {available}]{extra} for a bank of {bank_size} "
                         f"embeddings, got {k!r}; use a smaller k or a larger bank")


def _knn(bank: torch.Tensor, queries: torch.Tensor, k: int, *, exclude_self: bool, chunk: int = 1024
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) ascending distances to, and indices of, the k nearest bank rows of each query row.

    Chunks of queries bound memory at chunk * B distances. With exclude_self, row i ignores bank row i by
    index (not by zero distance), so exact duplicates elsewhere in the bank still count as neighbours.
    """
    dists, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        # No matmul shortcut: ||a||^2 + ||b||^2 - 2ab cancels badly for nearby points with large norms.
        d = torch.cdist(queries[start:start + chunk], bank, compute_mode="donot_use_mm_for_euclid_dist")
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = float("inf")
        top = torch.topk(d, k, dim=1, largest=False, sorted=True)
        dists.append(top.values)
        idx.append(top.indices)
    return torch.cat(dists), torch.cat(idx)


def bank_knn_distance(bank: Embeddings, k: int = 10) -> np.ndarray:
    """(B,) each bank row's shipped k-NN distance (dede_core.detector.knn.knn_distance) to the other rows.

    The k-NN row's label-free reference, as the held-out calibration images are for `knn_score`.
    """
    bank_t = _embeddings("bank", bank)
    _check_k(k, bank_t.shape[0], exclude_self=True)
    # The shipped function has no exclude-self, so ask for the (k+1)-th nearest row: a row's distance to itself
    # is 0 up to the rounding of cdist's matmul form, far below any neighbour's, so it takes the first place and
    # the (k+1)-th of all rows is the k-th of the others. An exact duplicate ties with it at ~0: same answer.
    return knn_distance(bank_t, bank_t, k + 1).double().numpy()


def slof(bank: Embeddings, queries: Embeddings, k: int = 10, *, exclude_self: bool = False) -> np.ndarray:
    """(N,) simplified local outlier factor (Schubert, Zimek & Kriegel 2014) of each query against the bank.

    What is computed, with kNN(x) the k nearest bank rows of x and m(x) the mean distance from x to them:
        density(x) = 1 / m(x)                      (bank rows: kNN within the bank, skipping themselves)
        slof(q)    = mean_{o in kNN(q)} density(o) / density(q) = m(q) * mean_{o in kNN(q)} 1 / m(o)
    About 1 inside a uniformly dense region, large for a query much sparser than its neighbours. Unlike LOF it
    uses plain distances instead of reachability distances. A bank row with m(o) = 0 (k exact duplicates)
    has its m floored at 1e-12 times the median m, so the score stays finite. Known blind spot: triggered
    samples that collapse into a tight cluster inside the bank are each other's dense neighbours.
    exclude_self: the queries are the bank itself (query i skips bank row i).
    """
    bank_t, query_t = _pair(bank, queries, k, exclude_self)
    _check_k(k, bank_t.shape[0], exclude_self=True)  # every bank row needs k neighbours other than itself
    bank_dist, _ = _knn(bank_t, bank_t, k, exclude_self=True)
    bank_mean = bank_dist.mean(dim=1)
    floor = 1e-12 * float(bank_mean.median()) or 1e-300
    bank_density = 1.0 / bank_mean.clamp_min(floor)
    query_dist, query_idx = _knn(bank_t, query_t, k, exclude_self=exclude_self)
    return (query_dist.mean(dim=1) * bank_density[query_idx].mean(dim=1)).numpy()


def spectral_signature(embeddings: Embeddings, *, clusters: int = 10, seed: int = 0) -> np.ndarray:
    """(N,) Tran et al.'s spectral-signature score with k-means pseudo-labels, computed on the set itself.

    The samples are split into `clusters` groups by scikit-learn KMeans (n_init=4, random_state=seed) in
    place of the class labels the original method needs. Within each group the embeddings are centred and
    projected on the group's top right singular vector; the score is the squared projection. A poisoned
    subset shifted along one shared direction dominates that vector and scores high. Transductive: scoring
    new samples means rerunning on the whole set. Scores are raw per-cluster values: a cluster with a larger
    spread also scores higher overall, as with per-class scores in the original method.
    """
    from sklearn.cluster import KMeans  # only this baseline needs scikit-learn

    x = _embeddings("embeddings", embeddings).numpy()
    if isinstance(clusters, bool) or not isinstance(clusters, int) or not 1 <= clusters <= x.shape[0]:
        raise ValueError(f"clusters must be an integer in [1, {x.shape[0]}] (the number of embeddings), "
                         f"got {clusters!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if clusters == 1:
        labels = np.zeros(x.shape[0], dtype=np.int64)
    else:
        labels = KMeans(n_clusters=clusters, n_init=4, random_state=seed).fit_predict(x)
    scores = np.zeros(x.shape[0], dtype=np.float64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if members.size < 2:
            continue  # one point has no spread: its centred embedding is zero, and so is its score
        centred = x[members] - x[members].mean(axis=0)
        # The top right singular vector of the centred matrix = the top principal direction of the cluster.
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        scores[members] = (centred @ vt[0]) ** 2
    return scores
