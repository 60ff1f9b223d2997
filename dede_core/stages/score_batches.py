"""One score job's shards: indexed, decoded in batches that span them, each batch scored and its rows routed
back to their shard by position; a shard is written (dede_core.stages.scoring.ScoreWriter) as soon as its last
row is back, so a killed job loses at most the shards still open.

A job takes its shards a window of about WINDOW samples at a time (windows): only the window's shards are
indexed (and, from a URL, downloaded) at once, so a job's memory does not grow with its corpus. Scores do not
depend on where a window ends: every forward pass is padded to the same chunk."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dede_core.io import source_index, storage
from dede_core.io.loader import make_loader
from dede_core.io.progress import Progress
from dede_core.io.sources import TarShardSource
from dede_core.stages import folder
from dede_core.stages.scoring import ScoreWriter
from schemas.manifest import ShardEntry, read_manifest
from schemas.tables import STATUS_OK, STATUS_READ_ERROR

log = logging.getLogger("dede")
WINDOW = 20_000  # samples of a job indexed and decoded at a time


def windows(entries: list[ShardEntry], size: int | None = None) -> Iterator[list[ShardEntry]]:
    """The entries in order, in runs of about `size` (default WINDOW) samples by their manifest counts; a shard is
    never split."""
    size = WINDOW if size is None else size
    run, samples = [], 0
    for entry in entries:
        run.append(entry)
        samples += entry.samples
        if samples >= size:
            yield run
            run, samples = [], 0
    if run:
        yield run


class JobProgress:
    """One job's progress line over its windows: samples scored, shards written."""

    def __init__(self, entries: list[ShardEntry], *, quiet: bool) -> None:
        self.shards, self.done = len(entries), 0
        self.bar = Progress(sum(e.samples for e in entries), desc="scoring", quiet=quiet or not entries)

    def samples(self, n: int) -> None:
        self.bar.update(n, f"shards {self.done}/{self.shards}")

    def close(self) -> None:
        self.bar.close(f"shards {self.done}/{self.shards}")


class ShardRows:
    """One pending shard: its reader and its result columns, filled by position as batches come back."""

    def __init__(self, entry: ShardEntry, source: TarShardSource, refs: SourceRefs) -> None:
        self.entry, self.source, self.keys = entry, source, source.keys()
        metas = [source.meta(i) for i in range(len(self.keys))]
        indexed = refs.lookup([key for key, meta in zip(self.keys, metas) if not meta.get("source")])
        self.sources = [_reference(meta, indexed.get(key)) for key, meta in zip(self.keys, metas)]
        self.stem = os.path.splitext(entry.name)[0]
        # Members the reader could not make a sample of come last, as read_error rows: nothing disappears.
        n = len(self.keys) + len(source.skipped)
        self.rows: list[dict[str, Any] | None] = [None] * n
        for j, (key, reason) in enumerate(source.skipped):
            self.rows[len(self.keys) + j] = {"key": key, "label": None, "width": None, "height": None,
                                             "status": STATUS_READ_ERROR, "error": reason}
        self.missing = len(self.keys)
        self.started: float | None = None


def _reference(meta: dict[str, Any], indexed: str | None) -> str | None:
    """A sample's source reference: its .json's `source` (written by `dede shard`), else the shards folder's
    source index, else the image folder path an older .json holds."""
    found = meta.get("source") or indexed or meta.get("path")
    return found if isinstance(found, str) else None


class SourceRefs:
    """key -> source reference from a shards folder's source index, for the samples whose .json names none
    (shards written before `dede shard` recorded it there). Read on first need, once, and kept as two Arrow
    columns: compact at any corpus size, where a dict of every key would grow with the corpus."""

    def __init__(self, shards_dir: str) -> None:
        self.shards_dir, self.table, self.loaded = shards_dir, None, False

    def lookup(self, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        if not self.loaded:
            ref = read_manifest(self.shards_dir).source_index
            self.table, self.loaded = source_index.read_table(self.shards_dir, ref, ["key", "item"]), True
        if self.table is None:
            return {}
        found = self.table.filter(pc.and_(pc.is_in(self.table["key"], value_set=pa.array(keys, pa.string())),
                                          pc.is_valid(self.table["item"])))
        return dict(zip(found["key"].to_pylist(), found["item"].to_pylist()))


def _open_part(shards_dir: str, entry: ShardEntry, scratch: str | None, refs: SourceRefs) -> ShardRows:
    """Index one shard; ValueError/OSError when it is missing, cut short or not a tar (the shard fails).
    A shard at a URL is downloaded into `scratch` first: the reader needs random access."""
    path = storage.join(shards_dir, entry.name)
    size = storage.getsize(path)
    if size != entry.bytes:
        raise ValueError(f"{path} is {size} bytes but the manifest says {entry.bytes}: it changed or was cut "
                         f"short since sharding; reshard or restore it")
    return ShardRows(entry, TarShardSource([storage.local_copy(path, scratch or "")]), refs)


def _route(batch: dict[str, Any], parts: list[ShardRows], run: ScoreWriter) -> list[ShardRows]:
    """Score a batch, put each row into its shard; returns the shards this batch completed."""
    ok = [i for i, status in enumerate(batch["status"]) if status == STATUS_OK]
    image, victim = batch["views"]
    results = run.score(image[ok], [batch["key"][i] for i in ok], victim=victim[ok]) if ok else {}
    scored = {i: {name: values[j] for name, values in results.items()} for j, i in enumerate(ok)}
    completed = []
    now = time.perf_counter()
    for i, (p, position) in enumerate(zip(batch["part"], batch["position"])):
        part = parts[p]
        part.started = part.started or now
        row = {name: batch[name][i] for name in ("label", "width", "height", "status", "error")}
        row["key"] = part.keys[position]  # known from the shard's index even when the sample cannot be read
        row["source"] = part.sources[position]
        if i in scored:
            row |= scored[i]
        part.rows[position] = row
        part.missing -= 1
        if part.missing == 0:
            completed.append(part)
    return completed


def open_parts(shards_dir: str, markers: folder.Markers, todo: list[ShardEntry], scratch: str | None = None,
               refs: SourceRefs | None = None) -> tuple[list[ShardRows], dict[str, str]]:
    """Index the pending shards; a broken one is recorded in _failed/ and left out, the others go on."""
    parts, failed = [], {}
    refs = SourceRefs(shards_dir) if refs is None else refs
    for entry in todo:
        try:
            parts.append(_open_part(shards_dir, entry, scratch, refs))
        except (OSError, ValueError) as exc:
            failed[entry.name] = f"{type(exc).__name__}: {exc}"
            log.warning(f"shard {entry.name} cannot be read and is not scored: {failed[entry.name]}")
            markers.mark_failed(entry.name, failed[entry.name])
    return parts, failed



def score_parts(parts: list[ShardRows], run: ScoreWriter, *, batch_size: int, workers: int,
                 progress: JobProgress) -> Counter:
    """Decode in workers, score batch by batch, write each shard as soon as its last sample is back."""
    counts: Counter = Counter()
    for part in [p for p in parts if p.missing == 0]:  # nothing readable inside: only read_error rows
        counts += run.write_shard(part)
        progress.done += 1
    loader = make_loader([p.source for p in parts], views=(run.ckpt.config.view, run.scorer.encoder.view),
                         batch_size=batch_size, workers=workers, pin_memory=run.scorer.device.type == "cuda")
    if len(loader.dataset):
        for batch in loader:
            for part in _route(batch, parts, run):
                counts += run.write_shard(part)
                part.rows = []  # free the finished shard's results
                progress.done += 1
            progress.samples(len(batch["key"]))
    return counts
