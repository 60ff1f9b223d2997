"""Shard stage: any corpus -> OUT/000000.tar, 000001.tar, ... (WebDataset) + OUT/manifest.json.

Each sample keeps its stable key and its original bytes, untouched, under the extension of its real format, so
the cleaned corpus written at the end is byte-for-byte the input minus the rejected samples. Each shard is
written to a temporary name and renamed; the manifest is written last, so a folder with a manifest is complete
and rerunning the same command is the recovery procedure.
"""

from __future__ import annotations

import logging
import dataclasses
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import webdataset as wds

from dede_core.io import source_index, storage
from dede_core.io.parquet import ParquetFiles, ParquetRows, find_parquet
from dede_core.io.progress import Progress
from dede_core.io.sources import TAR_IMAGE_EXTENSIONS, Sample, Source, TarShardSource, open_source
from schemas.manifest import Manifest, ShardEntry, differences, manifest_path, read_manifest, write_manifest

log = logging.getLogger("dede")
AnySource = Source | ParquetRows | ParquetFiles  # what _open gives

# Magic numbers of the formats dede decodes -> the extension a shard stores them under.
MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
         (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"BM", "bmp"))
UNKNOWN_EXTENSION = "bin"  # bytes of no known format: kept as they are, so the score stage reports them
# A fixed member mtime makes the same input give byte-identical shards (and the same sha256) on every run.
MEMBER_MTIME = 0


def sniff_extension(data: bytes) -> str | None:
    """The image format's usual extension from the leading bytes, or None when unknown."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in MAGIC if head.startswith(magic)), None)


def _extension(sample: Sample) -> str:
    """The real format first: a .png file holding a JPEG is stored as .jpg; then the original name's."""
    sniffed = sniff_extension(sample.data)
    if sniffed:
        return sniffed
    original = os.path.splitext(str(sample.meta.get("path", "")))[1].lstrip(".").lower()
    return original if original.isalnum() else UNKNOWN_EXTENSION


def _record(sample: Sample, classes: list[str] | None) -> dict[str, Any]:
    """Sample -> the dict webdataset's TarWriter writes: __key__, image bytes, .cls, .json."""
    record: dict[str, Any] = {"__key__": sample.key, _extension(sample): sample.data}
    meta = dict(sample.meta)
    if sample.label is not None:
        record["cls"] = str(sample.label).encode()
        if classes and 0 <= sample.label < len(classes):
            meta.setdefault("class", classes[sample.label])
    if meta:
        record["json"] = json.dumps(meta, sort_keys=True).encode()
    return record


class _HashingFile:
    """Write-only file wrapper that hashes and counts what passes through (tar 'w|' only calls write)."""

    def __init__(self, handle) -> None:
        self.handle, self.sha256, self.bytes = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.handle.write(data)


class _ShardFile:
    """One shard being written: a temporary file that becomes OUT/<index>.tar on finish().

    The temporary file sits in tmp_dir: OUT itself when local (the rename stays on one file system), a local
    scratch folder when OUT is a URL (the finished file is then uploaded in one piece)."""

    def __init__(self, out_dir: str, index: int, tmp_dir: str) -> None:
        self.name = f"{index:06d}.tar"
        self.path = storage.join(out_dir, self.name)
        self.out = storage.AtomicFile(self.path, scratch=tmp_dir)
        self.file = _HashingFile(self.out.file)
        self.writer = wds.TarWriter(self.file, encoder=False, mtime=MEMBER_MTIME)
        self.keys: list[str] = []

    def add(self, sample: Sample, classes: list[str] | None) -> str:
        """Append one sample; returns the extension its image went under."""
        record = _record(sample, classes)
        self.writer.write(record)
        self.keys.append(sample.key)
        return next(k for k in record if k not in ("__key__", "cls", "json"))

    def finish(self) -> ShardEntry:
        self.writer.close()
        self.out.commit()
        return ShardEntry(name=self.name, samples=len(self.keys), bytes=self.file.bytes,
                          sha256=self.file.sha256.hexdigest(), first_key=self.keys[0], last_key=self.keys[-1])

    def abort(self) -> None:
        self.out.abort()


def _write_all(samples: Iterator[Sample], out_dir: str, per_shard: int, classes: list[str] | None,
               progress: Progress, unread: Counter, tmp_dir: str, first: int = 0) -> list[ShardEntry]:
    """Stream samples into shards of per_shard numbered from `first`; counts in `unread` the extensions dede's
    tar reader skips."""
    entries: list[ShardEntry] = []
    current: _ShardFile | None = None
    try:
        for sample in samples:
            current = current or _ShardFile(out_dir, first + len(entries), tmp_dir)
            ext = current.add(sample, classes)
            if ext not in TAR_IMAGE_EXTENSIONS:
                unread[ext] += 1
            progress.update(1, f"shard {first + len(entries)}")
            if len(current.keys) == per_shard:
                entries.append(current.finish())
                current = None
        if current is not None:
            entries.append(current.finish())
    except BaseException:
        if current is not None:
            current.abort()
        raise
    return entries


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
    keep = {e.name for e in entries} | {index_file}
    for name in storage.listdir(out_dir):
        if ((re.fullmatch(r"\d{6}\.tar|source-\d{6}\.parquet", name) and name not in keep)
                or re.fullmatch(r"\.(\d{6}\.tar|source-\d{6}\.parquet|manifest\.json)\..*\.tmp", name)):
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


def update_shards(src: str, out_dir: str, *, samples_per_shard: int = 10_000, image_column: str | None = None,
                  key_column: str | None = None, label_column: str | None = None, follow_external_links: bool = False,
                  progress: bool = True) -> ShardUpdate:
    """Write SRC (image folder, WebDataset shards, or Parquet of image bytes: a file, a folder or a glob of files)
    as OUT/NNNNNN.tar shards
    plus OUT/manifest.json, or bring an existing OUT up to date with SRC: new and changed samples go into new
    shards after the existing ones (which stay byte-identical), removed and changed ones are listed in the
    manifest's `retired`. A rerun over an unchanged SRC reads no image and writes nothing."""
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive int (e.g. 10000), got {samples_per_shard!r}")
    src, out_dir = os.fspath(src), os.fspath(out_dir)
    if not storage.is_url(src) and not storage.is_url(out_dir) and os.path.realpath(src) == os.path.realpath(out_dir):
        raise ValueError(f"--out {out_dir} is the source folder itself; shard into a new folder")
    options = {"image_column": image_column, "key_column": key_column, "label_column": label_column}
    options = options if _is_parquet(src) else {k: v for k, v in options.items() if v is not None}
    if follow_external_links:
        options["follow_external_links"] = True
    wanted = {"source": _source_id(src), "samples_per_shard": samples_per_shard, "options": options}
    storage.makedirs(out_dir)
    done = _reusable(out_dir, wanted)
    source = _open(src, options)
    _check_unique(source)
    if len(source) == 0:
        raise ValueError(f"no samples in {src} (skipped: {source.skipped[:3]})")
    retired = list(done.retired) if done else []
    if done is None:
        old: dict[str, source_index.Entry] = {}
    else:
        old = source_index.read(out_dir, done.source_index)
        if old is None:
            log.info(f"{out_dir}: no source index (made by an older dede, or lost): hashing the shards and the source "
                f"to find what changed")
            old = source_index.from_shards(out_dir, [e.name for e in done.shards],
                                           {(r["shard"], r["key"]) for r in retired})
    classes = _merged_classes(done.classes if done else None, source.classes)
    kept = list(done.shards) if done else []
    changes, index = source_index.Changes(), {}
    todo = _classify(source, old, changes, index)
    if isinstance(source, (ParquetRows, ParquetFiles)) and done is not None and todo:
        empty, keys = {k for k, _ in done.skipped}, source.keys()
        if all(keys[i] in empty for i in todo):
            todo = {}  # only its empty rows are left and the file is unchanged (its other rows are): not read
    bar = Progress(len(todo), desc="sharding", quiet=not (progress and todo))
    samples = _pending(source, todo, old, classes, changes, index, len(kept), samples_per_shard, bar)
    unread: Counter = Counter()
    scratch = storage.scratch(out_dir)
    try:
        entries = _write_all(samples, out_dir, samples_per_shard, classes, bar, unread,
                             scratch.name if scratch else out_dir, first=len(kept))
    finally:
        if scratch:
            scratch.cleanup()
    changes.new_shards = [e.name for e in entries]
    bar.close(f"{len(entries)} new shards")
    changes.removed = [key for key in old if key not in index]
    retired += [{"key": k, "shard": old[k].shard, "reason": source_index.REMOVED} for k in changes.removed]
    retired += [{"key": k, "shard": old[k].shard, "reason": source_index.CHANGED} for k in changes.changed]
    skipped = list(source.skipped)
    if isinstance(source, (ParquetRows, ParquetFiles)) and not todo and done is not None:
        skipped = list(done.skipped)  # the file was not read again: its empty rows are as before
    if done is not None and not (changes.added or changes.changed or changes.removed) and (
            done.source_index and index == old and skipped == done.skipped):
        log.info(f"{out_dir} already sharded: {done.samples} samples in {len(done.shards)} shards; source unchanged "
            f"({changes.unchanged} samples); nothing to do")
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
                        samples=sum(e.samples for e in shards), classes=classes, skipped=skipped,
                        options=options, retired=retired, source_index=ref,
                        changes=changes.summary() | {"at": now})
    write_manifest(out_dir, manifest)
    _remove_stale(out_dir, shards, ref["file"])
    if done is not None:
        log.info(f"{out_dir} updated from {src}: {changes.text()}")
    if skipped:
        log.warning(f"{len(skipped)} source entries were not sharded (see skipped in "
            f"{manifest_path(out_dir)}), e.g. {skipped[0]}")
    if unread:
        log.warning(f"{sum(unread.values())} samples are stored as {', '.join(sorted(unread))}, which the tar "
            f"reader does not take as images ({'/'.join(TAR_IMAGE_EXTENSIONS)}): they will score as read_error")
    return ShardUpdate(manifest, changes)


def write_shards(src: str, out_dir: str, **kwargs: Any) -> Manifest:
    """update_shards, returning only the manifest (the shards folder's contract)."""
    return update_shards(src, out_dir, **kwargs).manifest


def list_shards(shards_dir: str) -> list[ShardEntry]:
    """The shards of a finished shards folder, in order; ValueError when its manifest is missing or invalid."""
    return list(read_manifest(shards_dir).shards)
