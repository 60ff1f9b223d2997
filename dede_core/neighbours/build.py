"""The plan's heavy part: one index over every embedding of the corpus, and every thumbnail in one file.

Two passes over the embeddings files, one shard at a time (memory: the index, plus a float16 training sample
for IVF): the first writes OUT/thumbs.npy and samples embeddings to train the projection and the IVF lists, the
second adds every embedding with its row id (and, for the re-ranking, its float16 copy: index.add_ivf).
Exact search needs no training: one pass. Files appear whole (storage.AtomicFile); OUT/index.json, written
last, says which corpus the index is of.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from dede_core.io import storage
from dede_core.neighbours import index as ix
from dede_core.neighbours.corpus import THUMB, Corpus, chunks
from schemas import names

log = logging.getLogger("dede")


def _sample_mask(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    return rng.random(n) < p


def npy_header(f, dtype: str, shape: tuple[int, int]) -> None:
    """Start a .npy file whose rows are then written in order (a streamed array, never whole in memory)."""
    np.lib.format.write_array_header_2_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})


def build_index(corpus: Corpus, out: str, spec: ix.IndexSpec, *, seed: int, progress: bool) -> dict[str, Any]:
    """Write OUT/thumbs.npy, OUT/index.faiss and (last) OUT/index.json; returns index.json's record."""
    faiss = ix._faiss()
    started, rng = time.perf_counter(), np.random.default_rng(seed)
    say = log.info if progress else log.debug
    p = spec.train / max(1, corpus.rows)
    sample, valid_rows = [], 0
    index = ix.empty_index(spec) if spec.kind == "exact" else None
    with storage.AtomicFile(storage.join(out, names.THUMBS)) as f:
        npy_header(f, "|u1", (corpus.rows, THUMB))
        for i, shard in enumerate(corpus.shards):
            for chunk in chunks(corpus, shard.stem):
                f.write(np.ascontiguousarray(chunk.thumbs).tobytes())
                x, rows = chunk.vectors[chunk.valid], chunk.rows[chunk.valid]
                valid_rows += len(x)
                if index is not None:
                    index.add_with_ids(x, rows)
                else:
                    sample.append(x[_sample_mask(len(x), p, rng)].astype(np.float16))
            if progress and (i + 1) % 50 == 0:
                say(f"neighbours: read {i + 1}/{len(corpus.shards)} shards ({valid_rows} embeddings)")
    read_s = time.perf_counter() - started
    train_s = 0.0
    if index is None:
        t = time.perf_counter()
        train = np.concatenate(sample) if sample else np.zeros((0, corpus.dim), np.float16)
        del sample
        if len(train) < spec.nlist:
            raise ValueError(f"{len(train)} sampled embeddings cannot train {spec.nlist} IVF lists; pass a smaller nlist")
        say(f"neighbours: training {spec.codes} IVF with {spec.nlist} lists on {len(train)} embeddings "
            f"(D={spec.dim} -> {spec.search_dim})")
        index = ix.empty_index(spec, train, seed=seed)
        del train
        train_s = time.perf_counter() - t
        for i, shard in enumerate(corpus.shards):
            for chunk in chunks(corpus, shard.stem, thumbs=False):
                ix.add_ivf(index, chunk.vectors, chunk.rows, chunk.valid)
            if progress and (i + 1) % 50 == 0:
                say(f"neighbours: indexed {i + 1}/{len(corpus.shards)} shards")
    if valid_rows < 2:
        raise ValueError(f"{corpus.scores} holds {valid_rows} embeddings: neighbourhoods need at least 2")
    holder = storage.AtomicFile(storage.join(out, names.INDEX))
    try:
        faiss.write_index(index, holder.tmp)  # FAISS writes the temporary by its path; commit renames it
    except BaseException:
        holder.abort()
        raise
    holder.commit()
    record = {"corpus_id": corpus.id, "rows": corpus.rows, "embeddings": valid_rows, "index": spec.to_dict(),
              "faiss_version": faiss.__version__, "read_s": round(read_s, 3), "train_s": round(train_s, 3),
              "build_s": round(time.perf_counter() - started, 3)}
    storage.write_json(storage.join(out, names.INDEX_INFO), record)
    say(f"neighbours: {spec.kind} index over {valid_rows} embeddings built in {record['build_s']:.1f} s")
    return record


_LOADED: dict[tuple[str, str, str], Any] = {}


def load_index(out: str, corpus_id: str, spec: ix.IndexSpec, device: str):
    """OUT/index.faiss, read once per process (and per corpus), ready to search on `device`."""
    key = (out, corpus_id, device)
    if key not in _LOADED:
        info = storage.read_json(storage.join(out, names.INDEX_INFO))
        if info["corpus_id"] != corpus_id:
            raise ValueError(f"{out}/{names.INDEX} is of another corpus ({info['corpus_id']}, not {corpus_id}): the "
                             f"scores folder changed since the plan; rerun")
        path, faiss = storage.join(out, names.INDEX), ix._faiss()
        if storage.is_url(path):
            with storage.open_read(path) as f:
                index = faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
        else:
            index = faiss.read_index(path)
        _LOADED.clear()  # one corpus' index at a time per process
        _LOADED[key] = ix.prepare(index, spec, device)
    return _LOADED[key]


def load_array(out: str, name: str) -> np.ndarray:
    """OUT/thumbs.npy memory-mapped, read-only (read whole from a URL folder)."""
    path = storage.join(out, name)
    if storage.is_url(path):
        with storage.open_read(path) as f:
            return np.load(f)
    return np.load(path, mmap_mode="r")
