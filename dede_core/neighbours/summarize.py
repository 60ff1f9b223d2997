"""The neighbours stage's finish: every shard's neighbour lists -> the corpus statistics, written per shard.

Holds the whole corpus' lists at once (the statistics compare each sample with its neighbours' own k-distances
and dimensions): N x k_max row ids (8 bytes), distances (4) and duplicate flags (1), plus the columns.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dede_core.io import storage
from dede_core.neighbours import geometry as geo
from dede_core.neighbours.corpus import Corpus, keys
from schemas import names
from schemas.tables import neighbours_schema, with_metadata

log = logging.getLogger("dede")

FINISH_BYTES_PER_NEIGHBOUR = 17  # int64 id + float32 distance + bool flag + float32 pixel distance


def _lists(corpus: Corpus, k: int, part_path: Callable[[str, str], str], out: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, k) ids, distances (NaN: no embedding), duplicate flags and thumbnail distances of the whole corpus,
    in row order."""
    ids = np.full((corpus.rows, k), -1, np.int64)
    dist = np.full((corpus.rows, k), np.nan, np.float32)
    dup = np.zeros((corpus.rows, k), bool)
    pix = np.full((corpus.rows, k), np.nan, np.float32)
    for shard in corpus.shards:
        with storage.open_read(part_path(out, shard.stem)) as f:
            table = pq.read_table(f)
        rows = table.column("row").to_numpy()
        assert np.array_equal(rows, np.arange(shard.offset, shard.offset + shard.rows)), shard.stem
        for name, target, fill in (("ids", ids, -1), ("dist", dist, np.nan), ("dup", dup, False),
                                   ("pix", pix, np.nan)):
            col = table.column(name).combine_chunks()
            valid = ~col.is_null().to_numpy(zero_copy_only=False)
            flat = col.values.slice(col.offset * k, len(col) * k).to_numpy(zero_copy_only=False)
            values = flat.reshape(len(col), k)
            target[rows[valid]] = values[valid]
    return ids, dist, dup, pix


def statistics(ids: np.ndarray, dist: np.ndarray, dup: np.ndarray, pix: np.ndarray, ks: tuple[int, ...], *,
               lof_k: int, distinct_k: int) -> tuple[dict[str, np.ndarray], float]:
    """Every column of the neighbours table but key/shard/position/row, for all N rows; and tau."""
    valid = ~np.isnan(dist).all(axis=1)
    cols: dict[str, np.ndarray] = {f"kdist_{k}": geo.kdist(dist, k) for k in ks}
    lid = geo.lid_mle(dist)
    cols["lid"] = lid
    cols["slof"] = geo.slof(dist, ids, lof_k)
    cols["dao"] = geo.dao(dist, ids, lid, lof_k)
    cols["kdist_distinct"] = geo.kdist_distinct(dist, dup, distinct_k)
    cols["dup_count"] = dup.sum(axis=1).astype(np.int32)
    cols["collapse"] = geo.collapse_ratio(dist, pix, distinct_k)
    tau = geo.tight_threshold(cols[f"kdist_{lof_k}"][valid])
    cols["group_id"], cols["group_size"] = geo.groups(ids, dist, tau)
    return {name: (value, valid) for name, value in cols.items()}, tau


def finish_corpus(corpus: Corpus, out: str, settings: Any, info: dict[str, Any], *, config: dict[str, Any],
                  started: float, part_path: Callable[[str, str], str]) -> dict[str, Any]:
    """Write OUT/<stem>.parquet for every shard, then OUT/summary.json (last); returns the summary."""
    t = time.perf_counter()
    ids, dist, dup, pix = _lists(corpus, settings.k_max, part_path, out)
    cols, tau = statistics(ids, dist, dup, pix, settings.ks, lof_k=settings.lof_k, distinct_k=settings.distinct_k)
    del ids, dist, dup, pix
    schema = with_metadata(neighbours_schema(settings.ks), "neighbours", json.dumps(config, sort_keys=True))
    for shard in corpus.shards:
        key, position = keys(corpus, shard.stem)
        at = slice(shard.offset, shard.offset + shard.rows)
        arrays = {"key": pa.array(key, pa.string()), "shard": pa.array([shard.name] * shard.rows, pa.string()),
                  "position": pa.array(position, pa.int32()),
                  "row": pa.array(np.arange(at.start, at.stop), pa.int64())}
        for name, (value, valid) in cols.items():
            v = value[at]
            ok = valid[at] & (np.isfinite(v) if v.dtype.kind == "f" else True)
            arrays[name] = pa.array(v, schema.field(name).type, mask=~ok)
        storage.write_parquet(storage.join(out, f"{shard.stem}.parquet"),
                              pa.Table.from_pydict(arrays, schema=schema))
    valid = cols["group_size"][1]
    label, size = cols["group_id"][0][valid], cols["group_size"][0][valid]
    sizes = Counter(np.bincount(label)[np.unique(label[size > 1])].tolist())
    finish_s = time.perf_counter() - t
    summary = {"corpus_id": corpus.id, "rows": corpus.rows, "embeddings": int(valid.sum()), "dim": corpus.dim,
               "shards": len(corpus.shards), "index": info["index"], "ks": list(settings.ks),
               "lof_k": settings.lof_k, "tau": tau, "groups": int(sum(sizes.values())),
               "grouped_samples": int((size > 1).sum()), "group_sizes": {str(k): v for k, v in sorted(sizes.items())},
               "finish_bytes": corpus.rows * settings.k_max * FINISH_BYTES_PER_NEIGHBOUR,
               "timings_s": {"build": info.get("build_s"), "finish": round(finish_s, 3),
                             "total": round(time.time() - started, 3)}}
    storage.write_json(storage.join(out, names.SUMMARY), summary)
    log.info(f"neighbours: {summary['embeddings']} samples, tau {tau:.3g}, {summary['groups']} tight groups "
             f"({summary['grouped_samples']} samples) -> {out}")
    return summary
