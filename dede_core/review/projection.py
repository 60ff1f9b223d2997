"""The corpus map: a 2-D projection of the victim's embeddings, flagged samples included, the rest sampled.

Embeddings come from RUN/scores/embeddings/<stem>.parquet (key, embedding: fixed_size_list<halffloat>), else from
the scores' own `embedding` column (`dede score --with-embedding`). PCA always; UMAP when umap-learn is installed.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MAX_POINTS = 20_000  # points drawn: every flagged sample, then a fixed random sample of the others
EMBEDDINGS_DIR = "embeddings"


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """(n, d) float32 from a list or fixed_size_list column of floats (half floats included)."""
    values = column.combine_chunks()
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(len(values), -1)


def read_embeddings(scores_dir: str) -> tuple[list[str], np.ndarray] | None:
    """(keys, (n, d) embeddings) of a run, or None when it stored none."""
    files = sorted(glob.glob(os.path.join(scores_dir, EMBEDDINGS_DIR, "*.parquet")))
    column = "embedding"
    if not files:
        files = [f for f in sorted(glob.glob(os.path.join(scores_dir, "*.parquet")))
                 if column in pq.read_schema(f).names]
    if not files:
        return None
    tables = [pq.read_table(f, columns=["key", column]) for f in files]
    table = pa.concat_tables(tables).filter(pc.is_valid(pa.concat_tables(tables).column(column)))
    if table.num_rows == 0:
        return None
    return table.column("key").to_pylist(), _matrix(table.column(column))


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of the rows of x (n, d) -> (n, 2)."""
    centred = x - x.mean(axis=0, keepdims=True)
    cov = centred.T @ centred / max(len(x) - 1, 1)
    _, vectors = np.linalg.eigh(cov.astype(np.float64))
    return (centred @ vectors[:, ::-1][:, :2]).astype(np.float32)


def corpus_map(scores_dir: str, flagged: set[str], *, max_points: int = MAX_POINTS, seed: int = 0) -> dict[str, Any]:
    """{method, note, points: [[x, y, flagged 0/1, key], ...]}; points empty (with a note) without embeddings."""
    found = read_embeddings(scores_dir)
    if found is None:
        return {"method": None, "points": [],
                "note": "no embeddings in this run: score with --with-embedding (or a run that writes "
                        "scores/embeddings/) to see the map"}
    keys, x = found
    hit = np.array([k in flagged for k in keys])
    others = np.flatnonzero(~hit)
    room = max(max_points - int(hit.sum()), 0)
    if len(others) > room:
        others = np.sort(np.random.default_rng(seed).choice(others, room, replace=False))
    chosen = np.concatenate([np.flatnonzero(hit), others])
    x = x[chosen]
    method, note = "PCA", f"{len(chosen)} of {len(keys)} samples (every flagged one)"
    try:
        import umap  # noqa: F401 - optional

        xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
        method = "UMAP"
    except ImportError:
        xy = pca_2d(x) if x.shape[1] >= 2 else np.c_[x, np.zeros(len(x))]
    points = [[round(float(a), 4), round(float(b), 4), int(hit[i]), keys[i]] for (a, b), i in zip(xy, chosen)]
    return {"method": method, "note": note, "points": points}
