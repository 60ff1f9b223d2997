"""Statistics of every sample's neighbourhood from the corpus' neighbour lists: (N, k) row ids and cosine
distances, nearest first, with NaN distances for samples without an embedding. Pure numpy, no I/O.

A triggered sample's victim embedding collapses onto the trigger's point, so triggered samples are each other's
nearest neighbours: small k-distances, a low local dimension, a tight group. A clean near-duplicate group (one
image re-encoded or resized) is tight too, but its thumbnails correlate: kdist_distinct skips such neighbours.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-7  # distances are floored here: exact duplicates have distance 0, and log 0 is no number


def kdist(dist: np.ndarray, k: int) -> np.ndarray:
    """(N,) distance to the k-th nearest other sample."""
    return dist[:, k - 1].astype(np.float64)


def lid_mle(dist: np.ndarray) -> np.ndarray:
    """(N,) Levina-Bickel maximum-likelihood local intrinsic dimension over all k distances:
    -1 / mean_i log(d_i / d_k). NaN where every distance is equal (no estimate)."""
    d = np.maximum(dist.astype(np.float64), EPS)
    logs = np.log(d / d[:, -1:]).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(logs < 0, -1.0 / logs, np.nan)


def _of_neighbours(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """values[ids] with NaN where an id is -1."""
    return np.where(ids >= 0, values[np.maximum(ids, 0)], np.nan)


def slof(dist: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """(N,) simplified LOF: kdist_k(x) / mean of kdist_k over x's k nearest neighbours."""
    own = np.maximum(kdist(dist, k), EPS)
    theirs = np.maximum(_of_neighbours(own, ids[:, :k]), EPS)
    return own / theirs.mean(axis=1)


def dao(dist: np.ndarray, ids: np.ndarray, lid: np.ndarray, k: int) -> np.ndarray:
    """(N,) dimensionality-aware outlier score (Anderberg et al., ICLR 2024): mean over x's k nearest neighbours o
    of (kdist_k(x) / kdist_k(o)) ** lid(o), summed in log space (log-sum-exp); +inf only past float64's range."""
    log_own = np.log(np.maximum(kdist(dist, k), EPS))
    nb = ids[:, :k]
    terms = _of_neighbours(lid, nb) * (log_own[:, None] - _of_neighbours(log_own, nb))
    top = np.nanmax(np.where(np.isnan(terms), -np.inf, terms), axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(over="ignore", divide="ignore"):  # a row without neighbours: log 0, made null by the writer
        log_mean = top[:, 0] + np.log(np.nansum(np.exp(terms - top), axis=1) / k)
        return np.exp(np.minimum(log_mean, 709.0))


def thumb_correlations(own: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Pearson correlation of each (n, P) thumbnail with each of its (n, k, P) neighbours' thumbnails -> (n, k);
    0 against a flat thumbnail. Own thumbnails are standardised; theirs only need their spread, since a
    zero-mean vector's dot product ignores their mean."""
    a = own.astype(np.float32)
    a -= a.mean(axis=-1, keepdims=True)
    sd_a = np.sqrt((a * a).mean(axis=-1, keepdims=True))
    a = np.where(sd_a > 0, a / np.maximum(sd_a, 1e-12), 0.0).astype(np.float32)
    b = theirs.astype(np.float32)
    dot = np.matmul(b, a[:, :, None])[..., 0]
    mean = b.mean(axis=-1)
    sd_b = np.sqrt(np.maximum(np.einsum("nkp,nkp->nk", b, b) / b.shape[-1] - mean * mean, 0.0))
    return np.where(sd_b > 1e-6, dot / (b.shape[-1] * np.maximum(sd_b, 1e-6)), 0.0)


def thumb_distances(own: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """Root-mean-square grey difference of each (n, P) thumbnail to each of its (n, k, P) neighbours' -> (n, k)."""
    diff = theirs.astype(np.float32) - own.astype(np.float32)[:, None, :]
    return np.sqrt(np.einsum("nkp,nkp->nk", diff, diff) / own.shape[-1])


def collapse_ratio(dist: np.ndarray, pix: np.ndarray, k: int) -> np.ndarray:
    """(N,) how much the k nearest neighbours differ in pixels (mean thumbnail distance) per unit of how close
    they are in the embedding (k-th cosine distance). A backdoor maps different pictures onto one target:
    tight in the embedding yet unlike in pixels, so the ratio is high. A clean group tight in the embedding is
    one picture's copies or one scene's views: alike in pixels too, and its ratio stays ordinary."""
    counted = np.isfinite(pix[:, :k]).sum(axis=1)  # a row without an embedding has none: NaN, no warning
    mean = np.where(np.isfinite(pix[:, :k]), pix[:, :k], 0.0).sum(axis=1) / np.maximum(counted, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counted > 0, mean / np.maximum(dist[:, k - 1], 1e-6), np.nan).astype(np.float64)


def kdist_distinct(dist: np.ndarray, dup: np.ndarray, k: int) -> np.ndarray:
    """(N,) distance to the k-th nearest neighbour that is no near-duplicate; with fewer than k such among the
    list, the distance to the last neighbour of the list."""
    count = np.cumsum(~dup, axis=1)
    hit = count >= k
    at = np.where(hit.any(axis=1), hit.argmax(axis=1), dist.shape[1] - 1)
    return dist[np.arange(len(dist)), at].astype(np.float64)


def tight_threshold(k_distance: np.ndarray) -> float:
    """tau = exp(median - 3 * 1.4826 * MAD) of log k-distance over the corpus: an abnormally tight distance."""
    logs = np.log(np.maximum(k_distance[np.isfinite(k_distance)], EPS))
    if not len(logs):
        return 0.0
    med = np.median(logs)
    return float(np.exp(med - 3 * 1.4826 * np.median(np.abs(logs - med))))


def groups(ids: np.ndarray, dist: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Connected components over the edges (i, j in i's list) with distance <= tau: (N,) group id (the lowest
    row of the component) and (N,) its size; a row with no such edge is its own group of 1."""
    n = len(ids)
    src, col = np.nonzero((dist <= tau) & (ids >= 0))
    a, b = src.astype(np.int64), ids[src, col]
    label = np.arange(n, dtype=np.int64)
    while len(a):  # min-label propagation with pointer jumping: rounds grow with log of a component's diameter
        before = label.copy()
        low = np.minimum(label[a], label[b])
        np.minimum.at(label, a, low)
        np.minimum.at(label, b, low)
        label = label[label]
        if np.array_equal(label, before):
            break
    size = np.bincount(label, minlength=n)[label]
    return label, size.astype(np.int32)
