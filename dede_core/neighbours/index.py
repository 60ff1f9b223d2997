"""The FAISS index over a corpus' unit embeddings, and the search for each sample's nearest other samples.

Up to `exact_limit` embeddings: exact search, IndexFlatIP over the L2-normalised float32 vectors (inner product is
the cosine). Beyond: an IVF index (k-means lists trained on a sample, `nprobe` lists searched per query) after an
uncentred projection onto the sample's top `pca_dim` principal directions, so an inner product there is the
cosine minus the part the dropped directions carried. So the IVF index only proposes `refine` x (k + 1)
candidates a query, and faiss' IndexRefine re-ranks them by their exact cosine over the full unit vectors, held
in the index as float16 (an fp16 scalar quantizer: N x 2D bytes, by row id): the distances written are exact,
the neighbours found are those of the candidates, and the recall against exact search is what the benchmark
measures (docs/results/neighbours.md). Re-ranking in C++ over codes in memory, on every thread, replaced a numpy
gather from a memory-mapped vectors.npy that took ~70% of a job. The IVF codes are float32 (Flat) when they fit
the memory budget, else 8-bit (SQ8), else product-quantised (PQ, d/4 bytes a vector).
"""

from __future__ import annotations

import logging
import math
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
    refine: int  # IVF: refine x (k + 1) candidates re-ranked by the exact cosine (<= 1: none; 0 for exact)
    index_bytes: int  # the index's size in memory, about (with the float16 vectors of the re-ranking)

    def to_dict(self) -> dict:
        return asdict(self)


def choose(n: int, dim: int, *, exact_limit: int, pca_dim: int | None, nlist: int | None, nprobe: int | None,
           memory_mib: int, refine: int = 4) -> IndexSpec:
    """The index for `n` embeddings: exact up to exact_limit; else IVF with nlist = 4 sqrt(n) lists and nprobe
    such that a query scans at least 2048 vectors and 16 lists (recall at 100k: 0.995 at 16 to 52 lists, the
    re-ranking bounds it; docs/results/neighbours.md), plus the float16 vectors of the re-ranking (n x 2D bytes).
    ValueError when even PQ codes exceed the budget."""
    budget = memory_mib * MIB
    if n <= exact_limit:
        spec = IndexSpec("exact", dim, dim, "Flat", 0, 0, 0, 0, n * dim * 4)
        if spec.index_bytes > budget:
            raise ValueError(f"exact search over {n} embeddings of D={dim} needs {spec.index_bytes // MIB} MiB, over "
                             f"the {memory_mib} MiB budget: lower exact_limit or raise memory_mib")
        return spec
    d = dim if pca_dim is None or pca_dim >= dim else pca_dim
    lists = nlist or int(min(65_536, max(16, round(4 * math.sqrt(n)))))
    probe = nprobe or int(min(lists, max(16, math.ceil(lists * 2048 / n))))
    train = int(min(n, max(40 * lists, 10_000)))
    sample_bytes = train * dim * 2  # the float16 training sample the plan holds
    refine_bytes = n * dim * 2 if refine > 1 else 0  # the re-ranking's float16 vectors
    for codes, per in (("Flat", 4 * d), ("SQ8", d), (f"PQ{max(1, d // 4)}", max(1, d // 4))):
        if codes.startswith("PQ") and d % max(1, d // 4):
            continue
        size = n * (per + 8) + lists * d * 4 + refine_bytes  # codes + their row ids + centroids + refine
        if size + sample_bytes <= budget:
            return IndexSpec("ivf", dim, d, codes, lists, probe, train, refine, size)
    raise ValueError(f"an IVF index over {n} embeddings needs more than the {memory_mib} MiB budget even with PQ "
                     f"codes (the re-ranking's float16 vectors: {refine_bytes // MIB} MiB): raise memory_mib, or "
                     f"refine=1 (no re-ranking)")


def projection(sample: np.ndarray, d: int) -> np.ndarray:
    """(d, D) rows: the top-d eigenvectors of the sample's uncentred second moment (an orthonormal basis)."""
    x = sample.astype(np.float32)
    moment = x.T @ x / len(x)
    _, vecs = np.linalg.eigh(moment.astype(np.float64))
    return np.ascontiguousarray(vecs[:, ::-1][:, :d].T, dtype=np.float32)


def empty_index(spec: IndexSpec, sample: np.ndarray | None = None, *, seed: int = 0):
    """An index ready to fill: exact (`add_with_ids`), or IVF trained on `sample` (unit vectors, any float dtype),
    wrapped in an IndexRefine when spec.refine > 1 (fill it with add_ivf)."""
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
    if spec.refine > 1:  # both parts empty here, as IndexRefine requires; add_ivf fills them apart
        exact = faiss.IndexScalarQuantizer(spec.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefine(index, exact)
        index.k_factor = spec.refine
    return index


def add_ivf(index, vectors: np.ndarray, rows: np.ndarray, valid: np.ndarray) -> None:
    """Add the next consecutive rows to an IVF index (empty_index): the valid ones to the IVF lists by row id,
    every one (zeros where not valid) to the re-ranking's float16 vectors, whose position is the row id."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexRefine):
        base, exact = faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)
        assert exact.ntotal == rows[0], "rows are added in row order, every one"
        exact.add(np.ascontiguousarray(vectors, np.float32))
        base.add_with_ids(vectors[valid], rows[valid])
        index.ntotal = exact.ntotal  # rows (its search checks labels < ntotal); the lists skip invalid rows
    else:
        index.add_with_ids(vectors[valid], rows[valid])


def prepare(index, spec: IndexSpec, device: str):
    """The index as searched: nprobe set; on a CUDA device a GPU copy when faiss has GPU support."""
    faiss = _faiss()
    if spec.kind == "ivf":
        base = index
        if isinstance(index, faiss.IndexRefine):
            index.k_factor = spec.refine
            base = faiss.downcast_index(index.base_index)
        faiss.extract_index_ivf(base).nprobe = spec.nprobe
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


def search(index, vectors: np.ndarray, rows: np.ndarray, k: int, *,
           batch: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k nearest OTHER samples: (n, k) row ids (-1: not found) and cosine distances (1 - cos,
    float32, NaN where not found), nearest first. The query's own row is dropped wherever it is returned.
    An IndexRefine (IVF) returns its candidates' exact inner products, re-ranked."""
    ids = np.empty((len(vectors), k), np.int64)
    dist = np.empty((len(vectors), k), np.float32)
    for at in range(0, len(vectors), batch):
        x, own = np.ascontiguousarray(vectors[at:at + batch], np.float32), rows[at:at + batch]
        sims, found = index.search(x, k + 1)
        keep = found != own[:, None]
        keep[keep.all(axis=1), -1] = False  # self not returned (approximate search): drop the farthest
        found, sims = found[keep].reshape(len(x), k), sims[keep].reshape(len(x), k)
        ids[at:at + len(x)] = found
        dist[at:at + len(x)] = np.where(found >= 0, np.clip(1.0 - sims, 0.0, 2.0), np.nan)
    return ids, dist
