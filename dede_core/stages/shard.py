"""Shard stage: any corpus -> OUT/000000.tar, 000001.tar, ... (WebDataset) + OUT/manifest.json.

Each sample keeps its stable key and its original bytes, untouched, under the extension of its real format, so
the cleaned corpus written at the end is byte-for-byte the input minus the rejected samples. Each shard is
written to a temporary name and renamed; the manifest is written last, so a folder with a manifest is complete
and rerunning the same command is the recovery procedure.
"""

from __future__ import annotations

import logging
import dataclasses
import os
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator


from dede_core.io import source_index, storage
from dede_core.io.parquet import ParquetFiles, ParquetRows, find_parquet
from dede_core.io.progress import Progress
from dede_core.io.sources import TAR_IMAGE_EXTENSIONS, Sample, Source, TarShardSource, open_source
from dede_core.io.tarwriter import sniff_extension, write_all  # noqa: F401 (sniff_extension: the shard stage's rule)
from schemas.manifest import (Manifest, ShardEntry, differences, manifest_path, read_manifest, spans_path,
                              write_manifest)

log = logging.getLogger("dede")
AnySource = Source | ParquetRows | ParquetFiles  # what _open gives

def _check_unique(source: AnySource) -> None:
    """Refuse duplicate keys: every later stage selects samples by key, so a duplicate is ambiguous."""
    seen: set[str] = set()
    dups = [k for k in source.keys() if k in seen or seen.add(k)]
    # TarShardSource keeps the first of a duplicated key and lists the others as skipped.
    dups += [key for key, reason in source.skipped if "duplicate key" in reason]
    if dups:
        shown = ", ".join(repr(k) for k in sorted(set(dups))[:10])
        raise ValueError(f"{len(set(dups))} duplicate sample key(s) in the source, e.g. {shown}: keys must be "
                         f"unique (give each sample its own name, or pass key_column for a Parquet source)")


def _is_parquet(src: str) -> bool:
    return find_parquet(src) is not None


def _source_id(src: str) -> str:
    return src if "://" in src else os.path.abspath(src)


def _open(src: str, options: dict[str, Any]) -> AnySource:
    options = dict(options)
    follow = bool(options.pop("follow_external_links", False))
    parquet = find_parquet(src)
    if parquet is not None:
        files, root = parquet
        return ParquetRows(src, **options) if files == [src] else ParquetFiles(files, root, **options)
    if any(v is not None for v in options.values()):
        raise ValueError(f"image_column, key_column and label_column apply to Parquet sources only, not {src}")
    if "://" in src:
        raise ValueError(f"remote sources are read for Parquet only; copy {src} locally first")
    source = open_source(src, follow_external_links=follow)
    if isinstance(source, TarShardSource) and os.path.isdir(src) and os.path.isfile(manifest_path(src)):
        source.classes = read_manifest(src).classes  # resharding our own shards keeps the class names
    return source


def _reusable(out_dir: str, wanted: dict[str, Any]) -> Manifest | None:
    """The existing manifest when it was made the same way and its shards are intact; None to (re)write."""
    if not storage.isfile(manifest_path(out_dir)):
        return None
    old = read_manifest(out_dir)
    had = {"source": old.source, "samples_per_shard": old.samples_per_shard, "options": old.options}
    diffs = differences(had, wanted)
    if diffs:
        raise ValueError(f"{out_dir} already holds shards made another way ({'; '.join(diffs)}); "
                         f"shard into a new folder, or delete {out_dir} first")
    for entry in old.shards:
        path = storage.join(out_dir, entry.name)
        if not storage.isfile(path) or storage.getsize(path) != entry.bytes:
            log.info(f"{path} is missing or changed since {manifest_path(out_dir)} was written: resharding")
            return None
    return old


def _remove_stale(out_dir: str, entries: list[ShardEntry], index_file: str | None) -> None:
    """Drop shards past the manifest's last one, older source indexes and temp files of killed runs."""
    keep = {e.name for e in entries} | {storage.basename(spans_path(out_dir, e.name)) for e in entries} | {index_file}
    for name in storage.listdir(out_dir):
        if ((re.fullmatch(r"\d{6}\.tar|\d{6}\.spans\.json|source-\d{6}\.parquet", name) and name not in keep)
                or re.fullmatch(r"\.(\d{6}\.tar|\d{6}\.spans\.json|source-\d{6}\.parquet|manifest\.json)\..*\.tmp",
                                name)):
            storage.unlink(storage.join(out_dir, name))



@dataclass(frozen=True)
class ShardUpdate:
    """What one `dede shard` call left on disk (manifest) and what it found and did (changes)."""

    manifest: Manifest
    changes: source_index.Changes


def _merged_classes(old: list[str] | None, new: list[str] | None) -> list[str] | None:
    """Old class names keep their index (their samples' .cls are written); new names are appended, sorted."""
    if old is None:
        return new
    return old + sorted(set(new or []) - set(old))


def _classify(source: AnySource, old: dict[str, source_index.Entry], changes: source_index.Changes,
              index: dict[str, source_index.Entry]) -> dict[int, tuple[str, int | None, int | None]]:
    """Samples whose file kept its name, size and mtime are unchanged, unread (into `index`); the others come
    back as {position: (item, size, mtime_ns)}, to be read and hashed."""
    keys, stats, todo = source.keys(), {}, {}
    for i, key in enumerate(keys):
        item, path = source.item(i)
        if path not in stats:
            stats[path] = source_index.file_stat(path)
        size, mtime = stats[path]
        was = old.get(key)
        if was and mtime is not None and (was.item, was.size, was.mtime_ns) == (item, size, mtime):
            index[key] = was
            changes.unchanged += 1
        else:
            todo[i] = (item, size, mtime)
    return todo


def _pending(source: AnySource, todo: dict[int, tuple[str, int | None, int | None]],
             old: dict[str, source_index.Entry], classes: list[str] | None, changes: source_index.Changes,
             index: dict[str, source_index.Entry], first: int, per_shard: int, bar: Progress) -> Iterator[Sample]:
    """The samples to write, read once: new keys and keys whose bytes changed (a touched file whose bytes are
    the same stays where it is). Fills `changes` and the new `index` on the way."""
    remap = None
    if classes and source.classes and classes != source.classes:
        remap = {i: classes.index(name) for i, name in enumerate(source.classes)}
    if isinstance(source, (ParquetRows, ParquetFiles)):
        pairs = ((todo[i], s) for i, s in source.indexed() if i in todo) if todo else iter(())
    else:
        pairs = ((where, source[i]) for i, where in todo.items())
    for (item, size, mtime), sample in pairs:
        sample = dataclasses.replace(sample, meta={**sample.meta, "source": item})  # the .json says where from
        digest = source_index.sha256(sample.data)
        was = old.get(sample.key)
        if was and was.sha256 == digest:
            index[sample.key] = source_index.Entry(item, was.shard, size, mtime, digest)
            changes.unchanged += 1
            bar.update(1, "unchanged")
            continue
        written = len(changes.added) + len(changes.changed)
        (changes.changed if was else changes.added).append(sample.key)
        index[sample.key] = source_index.Entry(item, f"{first + written // per_shard:06d}.tar", size, mtime, digest)
        if remap is not None and sample.label is not None:
            sample = dataclasses.replace(sample, label=remap[sample.label])
        yield sample


def _wanted(src: str, out_dir: str, samples_per_shard: int, columns: dict[str, str | None],
            follow_external_links: bool) -> dict[str, Any]:
    """The settings a shards folder is made with (recorded in its manifest; a rerun with others is refused)."""
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive int (e.g. 10000), got {samples_per_shard!r}")
    if not storage.is_url(src) and not storage.is_url(out_dir) and os.path.realpath(src) == os.path.realpath(out_dir):
        raise ValueError(f"--out {out_dir} is the source folder itself; shard into a new folder")
    options = columns if _is_parquet(src) else {k: v for k, v in columns.items() if v is not None}
    if follow_external_links:
        options["follow_external_links"] = True
    return {"source": _source_id(src), "samples_per_shard": samples_per_shard, "options": options}


def _previous_index(out_dir: str, done: Manifest | None) -> dict[str, source_index.Entry]:
    """key -> where each sample of the existing shards came from (empty for a new folder)."""
    if done is None:
        return {}
    old = source_index.read(out_dir, done.source_index)
    if old is None:
        log.info(f"{out_dir}: no source index (made by an older dede, or lost): hashing the shards and the "
                 f"source to find what changed")
        old = source_index.from_shards(out_dir, [e.name for e in done.shards],
                                       {(r["shard"], r["key"]) for r in done.retired})
    return old


def _write_new(out_dir: str, pending: Iterator[Sample], per_shard: int, classes: list[str] | None, bar: Progress,
               first: int) -> tuple[list[ShardEntry], Counter]:
    """The new and changed samples as shards numbered from `first`; -> (their entries, unread extensions)."""
    unread: Counter = Counter()
    scratch = storage.scratch(out_dir)
    try:
        entries = write_all(pending, out_dir, per_shard, classes, bar, unread, scratch.name if scratch else out_dir,
                             first=first)
    finally:
        if scratch:
            scratch.cleanup()
    bar.close(f"{len(entries)} new shards")
    return entries, unread


def _warn(out_dir: str, skipped: list, unread: Counter) -> None:
    if skipped:
        log.warning(f"{len(skipped)} source entries were not sharded (see skipped in {manifest_path(out_dir)}), "
                    f"e.g. {skipped[0]}")
    if unread:
        log.warning(f"{sum(unread.values())} samples are stored as {', '.join(sorted(unread))}, which the tar "
                    f"reader does not take as images ({'/'.join(TAR_IMAGE_EXTENSIONS)}): they will score as "
                    f"read_error")


def update_shards(src: str, out_dir: str, *, samples_per_shard: int = 10_000, image_column: str | None = None,
                  key_column: str | None = None, label_column: str | None = None, follow_external_links: bool = False,
                  progress: bool = True) -> ShardUpdate:
    """Write SRC (image folder, WebDataset shards, or Parquet of image bytes: a file, a folder or a glob of files)
    as OUT/NNNNNN.tar shards plus OUT/manifest.json, or bring an existing OUT up to date with SRC: new and changed
    samples go into new shards after the existing ones (which stay byte-identical), removed and changed ones are
    listed in the manifest's `retired`. A rerun over an unchanged SRC reads no image and writes nothing."""
    src, out_dir = os.fspath(src), os.fspath(out_dir)
    columns = {"image_column": image_column, "key_column": key_column, "label_column": label_column}
    wanted = _wanted(src, out_dir, samples_per_shard, columns, follow_external_links)
    options = wanted["options"]
    storage.makedirs(out_dir)
    done = _reusable(out_dir, wanted)
    source = _open(src, options)
    _check_unique(source)
    if len(source) == 0:
        raise ValueError(f"no samples in {src} (skipped: {source.skipped[:3]})")
    old, retired = _previous_index(out_dir, done), list(done.retired) if done else []
    classes = _merged_classes(done.classes if done else None, source.classes)
    kept = list(done.shards) if done else []
    changes, index = source_index.Changes(), {}
    todo = _classify(source, old, changes, index)
    parquet = isinstance(source, (ParquetRows, ParquetFiles))
    empty = {k for k, _ in done.skipped} if parquet and done is not None else set()
    if empty and todo and all(source.keys()[i] in empty for i in todo):
        todo = {}  # only its empty rows are left and the file is unchanged (its other rows are): not read
    bar = Progress(len(todo), desc="sharding", quiet=not (progress and todo))
    pending = _pending(source, todo, old, classes, changes, index, len(kept), samples_per_shard, bar)
    entries, unread = _write_new(out_dir, pending, samples_per_shard, classes, bar, len(kept))
    changes.new_shards = [e.name for e in entries]
    changes.removed = [key for key in old if key not in index]
    retired += [{"key": k, "shard": old[k].shard, "reason": source_index.REMOVED} for k in changes.removed]
    retired += [{"key": k, "shard": old[k].shard, "reason": source_index.CHANGED} for k in changes.changed]
    # An unread Parquet file's empty rows are as before.
    skipped = list(done.skipped) if parquet and not todo and done is not None else list(source.skipped)
    if done is not None and not (changes.added or changes.changed or changes.removed) and (
            done.source_index and index == old and skipped == done.skipped):
        log.info(f"{out_dir} already sharded: {done.samples} samples in {len(done.shards)} shards; source "
                 f"unchanged ({changes.unchanged} samples); nothing to do")
        _remove_stale(out_dir, done.shards, done.source_index["file"])
        return ShardUpdate(done, changes)
    if not kept and not entries:
        raise ValueError(f"no readable samples in {src} (skipped: {source.skipped[:3]})")
    if storage.isfile(manifest_path(out_dir)) and done is None:
        storage.unlink(manifest_path(out_dir))  # resharding from scratch: incomplete until done
    generation = (done.source_index or {}).get("generation", 0) + 1 if done else 1
    ref = source_index.write(out_dir, index, generation)
    shards = kept + entries
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = Manifest(source=wanted["source"], samples_per_shard=samples_per_shard, created=now, shards=shards,
                        samples=sum(e.samples for e in shards), classes=classes, skipped=skipped, options=options,
                        retired=retired, source_index=ref, changes=changes.summary() | {"at": now})
    write_manifest(out_dir, manifest)
    _remove_stale(out_dir, shards, ref["file"])
    if done is not None:
        log.info(f"{out_dir} updated from {src}: {changes.text()}")
    _warn(out_dir, skipped, unread)
    return ShardUpdate(manifest, changes)


def write_shards(src: str, out_dir: str, **kwargs: Any) -> Manifest:
    """update_shards, returning only the manifest (the shards folder's contract)."""
    return update_shards(src, out_dir, **kwargs).manifest


def list_shards(shards_dir: str) -> list[ShardEntry]:
    """The shards of a finished shards folder, in order; ValueError when its manifest is missing or invalid."""
    return list(read_manifest(shards_dir).shards)
