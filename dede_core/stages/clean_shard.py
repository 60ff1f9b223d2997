"""Cleaning one shard: its kept samples' tar members copied byte for byte into OUT/<name>, its dropped ones
(with their reasons) into OUT/_done/<stem>.rejected.parquet, then the marker OUT/_done/<stem>.json last.
One job of the clean stage (dede_core.stages.clean); small and picklable, so it runs in any process."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dede_core.io import digests, storage
from dede_core.io.source_index import CHANGED, REMOVED
from dede_core.io.tarspans import TarIndex, TarSample, copy_runs, index_tar, merge_runs, recorded_index
from dede_core.stages import folder
from dede_core.stages.select import Counts
from schemas.manifest import ShardEntry
from schemas.tables import REJECTED

RETIRED_REASONS = (REMOVED, CHANGED)  # samples the source no longer holds: dropped, never a duplicate


def rejected_table(rows: list[tuple[str, str, str | None, float | None, str]]) -> pa.Table:
    """(key, shard, source, score, reason) rows as the REJECTED table."""
    columns = list(zip(*rows)) if rows else [[] for _ in REJECTED]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, REJECTED)], schema=REJECTED)


def _scored_keys(scores_dir: str, name: str) -> dict[str, str | None]:
    """key -> source reference of every row of a shard's scores file (None where the file has no source)."""
    path = storage.join(scores_dir, folder.stem(name) + ".parquet")
    with storage.open_read(path) as f:
        file = pq.ParquetFile(f)
        table = file.read(columns=[c for c in ("key", "shard", "source") if c in file.schema_arrow.names])
    others = set(table.column("shard").to_pylist()) - {name}
    if others:
        raise ValueError(f"{path} holds rows of shard(s) {sorted(others)[:3]}, not only {name}; rescore")
    keys = table.column("key").to_pylist()
    sources = table.column("source").to_pylist() if "source" in table.column_names else [None] * len(keys)
    return dict(zip(keys, sources))


@dataclass(frozen=True)
class ShardJob:
    """Everything one shard's cleaning needs: small and picklable, so it can go to another process."""

    entry: ShardEntry
    shards_dir: str
    scores_dir: str
    out_dir: str
    dropped: dict[str, tuple[float | None, str]]  # key -> (score, reason) of this shard's dropped samples
    keep_unscored: bool
    unscored: int  # unscored rows of this shard in the scores table
    identity_sha: str  # the marker's claim that it belongs to this clean run
    copy: bool = True  # False: verdicts only, no OUT/<name> (dede clean --no-copy)
    seen: dict[str, str] = field(default_factory=dict)  # its keys an earlier shard holds -> that shard


def _clean_shard(job: ShardJob, src: str, scratch: str | None, *, scored: dict[str, str | None],
                 seen: dict[str, str]) -> dict[str, Any]:
    """Write OUT/<name> holding the kept samples; return the marker (counts, bytes, digest, rejected rows).
    src is a local copy of the shard; the new shard is written in scratch when OUT is a URL, else in OUT."""
    entry, out_dir, unscored = job.entry, job.out_dir, job.unscored
    name = entry.name
    index = recorded_index(job.shards_dir, entry) or index_tar(src)
    kept, rows = [], []
    for s in index.samples:
        source = scored.get(s.key)
        if job.dropped.get(s.key, (None, ""))[1] in RETIRED_REASONS:  # an old version: never in `seen`
            rows.append((s.key, name, source, *job.dropped[s.key]))
            continue
        if s.key in seen:
            rows.append((s.key, name, source, None, f"duplicate key (first seen in {seen[s.key]})"))
            continue
        seen[s.key] = name
        if s.key in job.dropped:
            rows.append((s.key, name, source, *job.dropped[s.key]))
        elif s.key in scored or job.keep_unscored:
            kept.append(s)
            unscored += s.key not in scored
        else:
            rows.append((s.key, name, None, None, "not scored"))
            unscored += 1
    rows += [(key, name, None, None, reason) for key, reason in index.others]
    stray = set(scored) - {s.key for s in index.samples}
    if stray:
        raise ValueError(f"the scores of {name} hold {len(stray)} key(s) that {src} does not (e.g. "
                         f"{sorted(stray)[:3]}): the scores belong to another corpus; rescore these shards")

    counts = Counts(total=len(kept) + len(rows), kept=len(kept), dropped=len(rows), unscored=unscored)
    marker = {"shard": name, "bytes": 0, digests.HASH: None, "samples": len(kept), "counts": counts.to_dict(),
              "first_key": kept[0].key if kept else "", "last_key": kept[-1].key if kept else ""}
    if job.copy:
        marker["bytes"], marker[digests.HASH] = _write_kept(job, src, scratch, index, kept)
    storage.write_parquet(folder.Markers(out_dir).path(name, ".rejected.parquet"), rejected_table(rows))
    return marker


def _write_kept(job: ShardJob, src: str, scratch: str | None, index: TarIndex, kept: list[TarSample]
                ) -> tuple[int, str]:
    """OUT/<name>: the kept samples' tar members copied byte for byte, every source byte checked against the
    digest the manifest records (sha256 in a folder written before issue #22); returns (bytes, BLAKE3) of it."""
    entry, out_dir, name = job.entry, job.out_dir, job.entry.name
    runs = merge_runs(index.gaps + [span for s in kept for span in s.spans])
    with storage.AtomicFile(storage.join(out_dir, name), scratch=scratch) as f:
        copied = copy_runs(src, entry.bytes, runs, f, source_hash=entry.hash)
        if copied.source_digest != entry.digest:
            raise ValueError(f"{src} does not match the {entry.hash} in its manifest; the shard changed: reshard")
    return copied.bytes, copied.digest


def clean_shard(job: ShardJob) -> dict[str, Any]:
    """Clean one shard of a plan: OUT/<name>, then _done/<stem>.rejected.parquet, then the marker
    _done/<stem>.json last; returns the marker. The keys an earlier shard (manifest order) already holds
    (job.seen) are dropped as duplicates, so shards can be cleaned in any order, or at once."""
    entry, out_dir = job.entry, job.out_dir
    src = storage.join(job.shards_dir, entry.name)
    if not storage.isfile(src) or storage.getsize(src) != entry.bytes:
        raise ValueError(f"{src} is missing or not the {entry.bytes} bytes its manifest says; reshard")
    if not storage.is_url(out_dir):
        for stale in glob.glob(os.path.join(glob.escape(out_dir), f".{glob.escape(entry.name)}.*.tmp")):
            os.unlink(stale)  # left by a killed run
    scratch = storage.scratch(job.shards_dir) or storage.scratch(out_dir)
    try:
        where = scratch.name if scratch else None
        marker = _clean_shard(job, storage.local_copy(src, where or ""), where if storage.is_url(out_dir) else None,
                              scored=_scored_keys(job.scores_dir, entry.name), seen=dict(job.seen))
    finally:
        if scratch:
            scratch.cleanup()
    marker["identity"] = job.identity_sha
    folder.Markers(out_dir).mark_done(entry.name, marker)
    return marker


def finished_marker(out_dir: str, name: str, identity_sha: str, copy: bool) -> dict[str, Any] | None:
    """The marker of a finished shard of this run, or None when the shard must be (re)written."""
    marker = folder.Markers(out_dir).done(name)
    if marker is None:
        return None
    out = storage.join(out_dir, name)
    part = folder.Markers(out_dir).path(name, ".rejected.parquet")
    ok = (marker.get("identity") == identity_sha and storage.isfile(part)
          and (not copy or (storage.isfile(out) and storage.getsize(out) == marker.get("bytes"))))
    return marker if ok else None
