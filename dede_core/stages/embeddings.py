"""The score stage's second table: every sample's victim embedding and a 16 x 16 thumbnail, per shard.

SCORES/embeddings/<stem>.parquet (schemas.tables.EMBEDDINGS) is what the corpus-level stages read (the neighbours
stage's index, the review app's map) without running the victim again. Size per sample: 2 D bytes of float16
embedding (2,560 B for EfficientNet-Lite0's 1,280) plus 256 B of thumbnail; the embeddings stay out of the
scores table, so `dede sql` never reads them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from dede_core.io import storage
from schemas import names
from schemas.tables import THUMB_SIDE, embeddings_schema

THUMB_VALUES = THUMB_SIDE * THUMB_SIDE


def thumbnails(images: Tensor) -> np.ndarray:
    """uint8 images (N, C, S, S) -> (N, THUMB_SIDE**2) uint8: the grey image, area-averaged to 16 x 16. Two
    copies of one picture (re-encoded, resized) give near-equal thumbnails; two different pictures do not."""
    grey = images.float().mean(dim=1, keepdim=True)
    small = torch.nn.functional.adaptive_avg_pool2d(grey, THUMB_SIDE)
    return small.round().clamp_(0, 255).to(torch.uint8).reshape(len(images), THUMB_VALUES).numpy()


def _fixed(rows: list[np.ndarray | None], width: int, kind: pa.DataType, dtype: np.dtype) -> pa.Array:
    """One fixed-size list column; a row without a value (a sample that was not scored) is null."""
    values = np.zeros((len(rows), width), dtype=dtype)
    for i, row in enumerate(rows):
        if row is not None:
            values[i] = row
    mask = pa.array([row is None for row in rows], pa.bool_())
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), kind), width, mask=mask)


def write_embeddings(scores_dir: str, stem: str, keys: list[str], embeddings: list[np.ndarray | None],
                     thumbs: list[np.ndarray | None], dim: int) -> None:
    """SCORES/embeddings/<stem>.parquet, one row per sample in shard position order (written before the shard's
    scores file and marker, so a done shard always has it)."""
    folder = storage.join(scores_dir, names.EMBEDDINGS_DIR)
    storage.makedirs(folder)
    table = pa.table({"key": pa.array(keys, pa.string()),
                      "position": pa.array(np.arange(len(keys), dtype=np.int32)),
                      "embedding": _fixed(embeddings, dim, pa.float16(), np.float16),
                      "thumb": _fixed(thumbs, THUMB_VALUES, pa.uint8(), np.uint8)},
                     schema=embeddings_schema(dim))
    storage.write_parquet(storage.join(folder, f"{stem}.parquet"), table)


def read_embeddings(path: str) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """(key/position table, float32 embeddings (N, D) with NaN rows for unscored samples, uint8 thumbs (N, 256))."""
    import pyarrow.parquet as pq

    with storage.open_read(path) as f:
        table = pq.read_table(f)
    emb, thumb = table.column("embedding").combine_chunks(), table.column("thumb").combine_chunks()
    dim = emb.type.list_size
    vectors = _values(emb).astype(np.float32).reshape(-1, dim)
    vectors[np.asarray(emb.is_null())] = np.nan  # a null row's slots hold zeros
    return table.select(["key", "position"]), vectors, _values(thumb).reshape(-1, THUMB_VALUES)


def _values(column: pa.FixedSizeListArray) -> np.ndarray:
    """Every slot of a fixed-size list column, null rows included (flatten() would leave them out)."""
    width = column.type.list_size
    return np.asarray(column.values[column.offset * width:(column.offset + len(column)) * width])
