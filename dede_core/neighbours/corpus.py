"""A scores folder's embeddings as one corpus: SCORES/embeddings/<stem>.parquet, one per scored shard.

Every sample gets a row id, its place in the corpus (shards in stem order, then position), so an index over the
whole corpus and the per-shard outputs agree on who a neighbour is. The corpus id hashes what the shards hold
(stem, rows, the shard's sha256 from its score marker, the file's size): a grown or rescored corpus has another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dede_core.io import storage
from dede_core.stages import folder
from schemas import names
from schemas.tables import THUMB_SIDE

THUMB = THUMB_SIDE * THUMB_SIDE
RESCORE = "rescore with this version of dede score (it writes SCORES/embeddings/)"


@dataclass(frozen=True)
class Shard:
    """One scored shard's embeddings file."""

    stem: str  # 000003
    name: str  # the shard's file name, as the scores table has it (000003.tar)
    rows: int  # samples in the file
    offset: int  # row id of its first sample


@dataclass(frozen=True)
class Corpus:
    """Every embeddings file of a scores folder, in stem order."""

    scores: str  # the scores folder
    shards: tuple[Shard, ...]
    dim: int  # D, the victim's embedding width
    id: str  # changes when a shard is added, removed or rescored

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def path(self, stem: str) -> str:
        return storage.join(self.scores, names.EMBEDDINGS_DIR, f"{stem}.parquet")

    def shard(self, stem: str) -> Shard:
        return next(s for s in self.shards if s.stem == stem)


def _dim(schema: pa.Schema, path: str) -> int:
    kind = schema.field("embedding").type if "embedding" in schema.names else None
    if not pa.types.is_fixed_size_list(kind) or not pa.types.is_float16(kind.value_type):
        raise ValueError(f"{path}: column embedding must be fixed_size_list<halffloat>[D], got {kind}; {RESCORE}")
    return kind.list_size


def read_corpus(scores: str) -> Corpus:
    """The scores folder's embeddings files, checked: one per finished shard, one D for all (else ValueError)."""
    where = storage.join(scores, names.EMBEDDINGS_DIR)
    if not storage.isfile(storage.join(scores, names.SCORE_RUN)):
        raise ValueError(f"{scores} is no scores folder (no {names.SCORE_RUN}); run dede score first")
    if not storage.isdir(where):
        raise ValueError(f"{scores} has no {names.EMBEDDINGS_DIR}/ folder: {RESCORE}")
    markers = folder.Markers(scores).all_done()
    if not markers:
        raise ValueError(f"{scores} holds no finished shard (no {names.DONE_DIR}/ markers); run dede score first")
    by_stem = {folder.stem(m["shard"]): m for m in markers}
    have = {n[:-len(".parquet")] for n in storage.listdir(where) if n.endswith(".parquet")}
    missing = sorted(set(by_stem) - have)
    if missing:
        raise ValueError(f"{len(missing)} scored shards have no embeddings file ({', '.join(missing[:5])} in {where}); "
                         f"{RESCORE}")
    shards, dims, offset, ident = [], {}, 0, []
    for stem in sorted(by_stem):
        path = storage.join(where, f"{stem}.parquet")
        with storage.open_read(path) as f:
            meta = pq.ParquetFile(f).metadata
            dims[stem] = _dim(meta.schema.to_arrow_schema(), path)
            rows = meta.num_rows
        shards.append(Shard(stem=stem, name=by_stem[stem]["shard"], rows=rows, offset=offset))
        ident.append([stem, rows, by_stem[stem].get("sha256"), storage.getsize(path)])
        offset += rows
    if len(set(dims.values())) > 1:
        first, odd = shards[0].stem, next(s for s, d in dims.items() if d != dims[shards[0].stem])
        raise ValueError(f"embedding widths differ: {first} has D={dims[first]}, {odd} has D={dims[odd]}; one "
                         f"scores folder holds one victim's embeddings")
    digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    return Corpus(scores=scores, shards=tuple(shards), dim=dims[shards[0].stem], id=f"{offset} rows, {digest}")


@dataclass(frozen=True)
class Chunk:
    """Consecutive samples of one shard: (n,) rows, (n, D) unit float32 vectors (zeros where not valid)."""

    rows: np.ndarray  # int64 row ids
    vectors: np.ndarray  # float32, L2-normalised
    valid: np.ndarray  # bool: the sample has an embedding
    thumbs: np.ndarray  # (n, 256) uint8, zeros where not valid


def _fixed(column: pa.ChunkedArray, width: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(n, width) values and the (n,) validity of a fixed_size_list column; nulls read as zeros."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    flat = arr.values.slice(arr.offset * width, len(arr) * width)
    values = np.array(flat.fill_null(0).to_numpy(zero_copy_only=False), dtype=dtype).reshape(len(arr), width)
    values[~valid] = 0
    return values, valid


def chunks(corpus: Corpus, stem: str, *, batch: int = 16_384, thumbs: bool = True) -> Iterator[Chunk]:
    """One shard's samples in position order, `batch` rows at a time."""
    shard = corpus.shard(stem)
    columns = ["position", "embedding"] + (["thumb"] if thumbs else [])
    with storage.open_read(corpus.path(stem)) as f:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=batch, columns=columns):
            position = rb.column("position").to_numpy().astype(np.int64)
            x, valid = _fixed(rb.column("embedding"), corpus.dim, np.float32)
            norm = np.linalg.norm(x, axis=1, keepdims=True)
            valid &= norm[:, 0] > 0
            x /= np.maximum(norm, 1e-12)
            t = _fixed(rb.column("thumb"), THUMB, np.uint8)[0] if thumbs else np.zeros((len(x), 0), np.uint8)
            yield Chunk(rows=shard.offset + position, vectors=x, valid=valid, thumbs=t)


def keys(corpus: Corpus, stem: str) -> tuple[list[str], np.ndarray]:
    """A shard's keys and positions, in file order."""
    with storage.open_read(corpus.path(stem)) as f:
        table = pq.read_table(f, columns=["key", "position"])
    return table.column("key").to_pylist(), table.column("position").to_numpy()


def embeddings_table(keys: list[str], vectors: np.ndarray, thumbs: np.ndarray,
                     valid: np.ndarray | None = None) -> pa.Table:
    """A shard's EMBEDDINGS table (schemas.tables.embeddings_schema) from (n, D) vectors and (n, 256) uint8
    thumbnails; rows where `valid` is False get null embedding and thumb."""
    from schemas.tables import embeddings_schema

    n, dim = vectors.shape
    mask = pa.array(np.zeros(n, bool) if valid is None else ~np.asarray(valid, bool))
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float16).ravel(), pa.float16()), dim,
                                            mask=mask)
    th = pa.FixedSizeListArray.from_arrays(pa.array(thumbs.astype(np.uint8).ravel(), pa.uint8()), THUMB, mask=mask)
    return pa.Table.from_arrays([pa.array(keys, pa.string()), pa.array(np.arange(n, dtype=np.int32)), emb, th],
                                schema=embeddings_schema(dim))
