"""The FAISS index over a corpus' unit embeddings, and the search for each sample's nearest other samples.

Up to `exact_limit` embeddings: exact search, IndexFlatIP over the L2-normalised float32 vectors (inner product is
the cosine). Beyond: an IVF index (k-means lists trained on a sample, `nprobe` lists searched per query) after an
uncentred projection onto the sample's top `pca_dim` principal directions, so an inner product there is the
cosine minus the part the dropped directions carried. So the IVF index only proposes `refine` x k candidates a
query, and they are re-ranked by their exact cosine over the full unit vectors (OUT/vectors.npy, float16,
memory-mapped): the distances written are exact, the neighbours found are those of the candidates, and the
recall against exact search is what the benchmark measures (docs/results/neighbours.md). The codes are float32
(Flat) when they fit the memory budget, else 8-bit (SQ8), else product-quantised (PQ, d/4 bytes a vector).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger("dede")

MIB = 1 << 20


def _faiss():
    import faiss  # imported where used: the rest of dede runs without it

    return faiss


@dataclass(frozen=True)
class IndexSpec:
    """Which index a corpus of `n` embeddings of width `dim` gets (choose())."""

    kind: str  # exact | ivf
    dim: int  # D of the embeddings
    search_dim: int  # dims the index searches in: D, or pca_dim after the projection
    codes: str  # Flat | SQ8 | PQ<m>: how each vector is stored
    nlist: int  # IVF lists (0 for exact)
    nprobe: int  # lists searched per query (0 for exact)
    train: int  # embeddings sampled to fit the projection and the lists (0 for exact)
    refine: int  # IVF: refine x k candidates re-ranked by the exact cosine (0: none, for exact)
    index_bytes: int  # the index's size in memory, about

    def to_dict(self) -> dict:
        return asdict(self)


def choose(n: int, dim: int, *, exact_limit: int, pca_dim: int | None, nlist: int | None, nprobe: int | None,
           memory_mib: int, refine: int = 4) -> IndexSpec:
    """The index for `n` embeddings: exact up to exact_limit; else IVF with nlist = 4 sqrt(n) lists and nprobe
    such that a query scans at least 4096 vectors and 32 lists. ValueError when even PQ codes exceed the budget."""
    budget = memory_mib * MIB
    if n <= exact_limit:
        spec = IndexSpec("exact", dim, dim, "Flat", 0, 0, 0, 0, n * dim * 4)
        if spec.index_bytes > budget:
            raise ValueError(f"exact search over {n} embeddings of D={dim} needs {spec.index_bytes // MIB} MiB, over "
                             f"the {memory_mib} MiB budget: lower exact_limit or raise memory_mib")
        return spec
    d = dim if pca_dim is None or pca_dim >= dim else pca_dim
    lists = nlist or int(min(65_536, max(16, round(4 * math.sqrt(n)))))
    probe = nprobe or int(min(lists, max(32, math.ceil(lists * 4096 / n))))
    train = int(min(n, max(40 * lists, 10_000)))
    sample_bytes = train * dim * 2  # the float16 training sample the plan holds
    for codes, per in (("Flat", 4 * d), ("SQ8", d), (f"PQ{max(1, d // 4)}", max(1, d // 4))):
        if codes.startswith("PQ") and d % max(1, d // 4):
            continue
        size = n * (per + 8) + lists * d * 4  # codes + their row ids + centroids
        if size + sample_bytes <= budget:
            return IndexSpec("ivf", dim, d, codes, lists, probe, train, refine, size)
    raise ValueError(f"an IVF index over {n} embeddings needs more than the {memory_mib} MiB budget even with PQ "
                     f"codes: raise memory_mib or lower pca_dim")


def projection(sample: np.ndarray, d: int) -> np.ndarray:
    """(d, D) rows: the top-d eigenvectors of the sample's uncentred second moment (an orthonormal basis)."""
    x = sample.astype(np.float32)
    moment = x.T @ x / len(x)
    _, vecs = np.linalg.eigh(moment.astype(np.float64))
    return np.ascontiguousarray(vecs[:, ::-1][:, :d].T, dtype=np.float32)


def empty_index(spec: IndexSpec, sample: np.ndarray | None = None, *, seed: int = 0):
    """An index ready to `add_with_ids`: exact, or IVF trained on `sample` (unit vectors, any float dtype)."""
    faiss = _faiss()
    if spec.kind == "exact":
        return faiss.IndexIDMap(faiss.IndexFlatIP(spec.dim))
    ivf = faiss.index_factory(spec.search_dim, f"IVF{spec.nlist},{spec.codes}", faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter, ivf.cp.seed = 10, seed  # 10 k-means rounds: lists for search, not a clustering result
    ivf.cp.max_points_per_centroid = 1 << 30  # the sample is already sized (IndexSpec.train)
    x = sample.astype(np.float32)
    if spec.search_dim < spec.dim:
        transform = faiss.LinearTransform(spec.dim, spec.search_dim, False)
        faiss.copy_array_to_vector(projection(x, spec.search_dim).ravel(), transform.A)
        transform.is_trained = True
        ivf.train(transform.apply(x))
        index = faiss.IndexPreTransform(transform, ivf)  # the faiss wrapper keeps both parts referenced
    else:
        ivf.train(x)
        index = ivf
    return index


def prepare(index, spec: IndexSpec, device: str):
    """The index as searched: nprobe set; on a CUDA device a GPU copy when faiss has GPU support."""
    faiss = _faiss()
    if spec.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = spec.nprobe
    if device.startswith("cuda") and hasattr(faiss, "index_cpu_to_gpu") and faiss.get_num_gpus() > 0:
        try:
            gpu = int(device.split(":")[1]) if ":" in device else 0
            moved = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
            if spec.kind == "ivf":
                faiss.GpuParameterSpace().set_index_parameter(moved, "nprobe", spec.nprobe)
            return moved
        except RuntimeError as exc:  # an index type the GPU build does not take: search on the CPU
            log.warning("neighbours: the index stays on the CPU (%s)", exc)
    return index


def _exact_sims(full: np.ndarray, x: np.ndarray, found: np.ndarray) -> np.ndarray:
    """(n, c) exact inner products of each query with its c candidates' float16 rows of `full`. Through torch:
    numpy converts float16 without SIMD, ~30x slower, and that conversion was most of a job's time."""
    import torch

    with warnings.catch_warnings():  # a read-only memory map: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        table = torch.from_numpy(np.asarray(full))
    theirs = table.index_select(0, torch.from_numpy(np.maximum(found, 0).ravel()))
    theirs = theirs.view(found.shape[0], found.shape[1], -1).float()
    return torch.bmm(theirs, torch.from_numpy(x)[:, :, None])[..., 0].numpy()


def search(index, vectors: np.ndarray, rows: np.ndarray, k: int, *, full: np.ndarray | None = None,
           refine: int = 0, batch: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k nearest OTHER samples: (n, k) row ids (-1: not found) and cosine distances (1 - cos,
    float32, NaN where not found), nearest first. The query's own row is dropped wherever it is returned.
    With `full` ((rows, D) unit vectors by row id) and refine > 1: refine x k candidates re-ranked exactly."""
    wide = refine > 1 and full is not None
    c = refine * k + 1 if wide else k + 1
    if wide:
        batch = max(64, min(batch, (64 * MIB) // (c * full.shape[1] * 4)))  # the gathered candidates: <= 64 MiB
    ids = np.empty((len(vectors), k), np.int64)
    dist = np.empty((len(vectors), k), np.float32)
    for at in range(0, len(vectors), batch):
        x, own = np.ascontiguousarray(vectors[at:at + batch], np.float32), rows[at:at + batch]
        sims, found = index.search(x, c)
        if wide:
            sims = _exact_sims(full, x, found)
            sims[found < 0] = -np.inf
            sims[found == own[:, None]] = -np.inf
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            found, sims = np.take_along_axis(found, order, 1), np.take_along_axis(sims, order, 1)
            found[~np.isfinite(sims)] = -1
        else:
            keep = found != own[:, None]
            keep[keep.all(axis=1), -1] = False  # self not returned (approximate search): drop the farthest
            found, sims = found[keep].reshape(len(x), k), sims[keep].reshape(len(x), k)
        ids[at:at + len(x)] = found
        dist[at:at + len(x)] = np.where(found >= 0, np.clip(1.0 - sims, 0.0, 2.0), np.nan)
    return ids, dist
