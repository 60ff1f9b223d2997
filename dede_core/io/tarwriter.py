"""Writing WebDataset tar shards: each sample under its stable key with its original bytes, the extension of its
real format, a .cls label and a .json of its metadata; the byte span of every sample is recorded as it is
written (io/tarspans), so clean can copy runs of kept samples without parsing the tar again."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Iterator

import webdataset as wds

from dede_core.io import digests, storage
from dede_core.io.progress import Progress
from dede_core.io.sources import TAR_IMAGE_EXTENSIONS, Sample
from dede_core.io.tarspans import SpanRecorder
from schemas.manifest import ShardEntry, ShardSpans, write_spans

# Magic numbers of the formats dede decodes -> the extension a shard stores them under.
MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
         (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"BM", "bmp"))
UNKNOWN_EXTENSION = "bin"  # bytes of no known format: kept as they are, so the score stage reports them
# A fixed member mtime makes the same input give byte-identical shards (and the same digest) on every run.
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
        self.handle, self.digest, self.bytes = handle, digests.new(digests.HASH), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.handle.write(data)


class _ShardFile:
    """One shard being written: a temporary file that becomes OUT/<index>.tar on finish().

    The temporary file sits in tmp_dir: OUT itself when local (the rename stays on one file system), a local
    scratch folder when OUT is a URL (the finished file is then uploaded in one piece)."""

    def __init__(self, out_dir: str, index: int, tmp_dir: str) -> None:
        self.name, self.out_dir = f"{index:06d}.tar", out_dir
        self.path = storage.join(out_dir, self.name)
        self.out = storage.AtomicFile(self.path, scratch=tmp_dir)
        self.file = _HashingFile(self.out.file)
        self.writer = wds.TarWriter(self.file, encoder=False, mtime=MEMBER_MTIME)
        self.keys: list[str] = []
        self.spans = SpanRecorder()

    def add(self, sample: Sample, classes: list[str] | None) -> str:
        """Append one sample; returns the extension its image went under."""
        record = _record(sample, classes)
        self.spans.before(self.writer)
        self.writer.write(record)
        self.keys.append(sample.key)
        return next(k for k in record if k not in ("__key__", "cls", "json"))

    def finish(self) -> ShardEntry:
        offsets = self.spans.end(self.writer)
        self.writer.close()
        self.out.commit()
        entry = ShardEntry(name=self.name, samples=len(self.keys), bytes=self.file.bytes, sha256=None,
                           blake3=self.file.digest.hexdigest(), first_key=self.keys[0], last_key=self.keys[-1])
        write_spans(self.out_dir, ShardSpans(entry.name, entry.bytes, entry.sha256, self.keys, offsets,
                                             blake3=entry.blake3))
        return entry

    def abort(self) -> None:
        self.out.abort()


def write_all(samples: Iterator[Sample], out_dir: str, per_shard: int, classes: list[str] | None,
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
