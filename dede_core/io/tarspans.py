"""Byte spans of the samples in a tar shard, and copies of contiguous runs of them.

The shard stage records where each sample lies as it writes the tar (`SpanRecorder`), so clean copies the runs
of kept samples without parsing the tar again: a shard where 95% is kept is a few large writes. `copy_runs`
reads the source once, in large chunks, writing the runs straight from the chunk it read while two threads hash
the source (clean checks it against the manifest) and the output (the cleaned manifest records it).

Why no kernel copy (os.copy_file_range): clean must hash every byte it reads and writes, so the bytes pass
through this process anyway; measured on the 2-core machine of docs/results/throughput.md (a 0.4 GB corpus of
224-px JPEGs, 5% dropped, other jobs on the cores), writing from the hashing buffer ran at 390-460 MB/s and the
kernel copy of the same runs beside a hashing read at 300-340 MB/s. Hashing in the two threads beside the copy
(the buffers kept per thread) took a quiet machine's 1.12 GB clean from 336 to 418 MB/s (issue #15 notes there).
The hashes are BLAKE3 since issue #22 (io/digests; sha256 still for a source recorded with it), and the output is
handed to the disk chunk by chunk as it is written (`writeback`), so the fsync before each shard's marker waits for
little: on the loaded 2-core machine of issue #22 that took copy_runs + fsync of 0.43 GB from 1.45 s to 1.0-1.1 s.
"""

from __future__ import annotations

import ctypes
import io
import sys
import tarfile
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple

from dede_core.io import digests, storage
from dede_core.io.sources import clean_key, group_members  # the scorer's key rule, so keys match the scores
from schemas.manifest import ShardEntry, read_spans

CHUNK = 8 << 20  # bytes read (and hashed) at a time
BUFFERS = 3  # chunks in flight: one being read and written while the hashes finish the two before it
_held = threading.local()  # each thread's buffers (clean may run shards in several threads)
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing the range's dirty pages, do not wait for them


@dataclass(frozen=True)
class CopyResult:
    """What copy_runs read and wrote."""

    source_digest: str  # hex digest of the whole source, every byte read once, under the algorithm asked for
    bytes: int  # bytes written: the runs plus the end-of-archive blocks
    digest: str  # hex digest of what was written, under digests.HASH (BLAKE3)


class SpanRecorder:
    """Sample offsets of a tar being written by webdataset's TarWriter: call `before(writer)` before each
    sample's write and `end(writer)` before the writer is closed. TarWriter writes a sample's members one after
    the other, so sample i is the bytes [offsets[i], offsets[i + 1])."""

    def __init__(self) -> None:
        self.offsets: list[int] = []

    def before(self, writer: Any) -> None:
        self.offsets.append(writer.tarstream.offset)  # tarfile's position in the archive, headers included

    def end(self, writer: Any) -> list[int]:
        """The offsets, closed by where the end-of-archive blocks will start."""
        return self.offsets + [writer.tarstream.offset]


def merge_runs(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [start, end) spans with touching neighbours joined: a shard where 95% is kept is a few runs."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def end_of_archive(written: int) -> bytes:
    """The end of an archive as tarfile writes it after `written` bytes: two zero blocks, padded to a record."""
    trailer = 2 * tarfile.BLOCKSIZE
    return bytes(trailer + (-(written + trailer) % tarfile.RECORDSIZE))


def _check_runs(runs: list[tuple[int, int]], size: int) -> None:
    last = 0
    for start, end in runs:
        if not last <= start <= end <= size:
            raise ValueError(f"runs must be sorted, disjoint [start, end) spans within the {size} bytes of the "
                             f"source; got ({start}, {end}) after {last}")
        last = end


def _parts(runs: list[tuple[int, int]], at: int, pos: int, n: int) -> tuple[list[tuple[int, int]], int]:
    """The pieces of runs[at:] inside [pos, pos + n), and the index of the first run that goes on past it."""
    parts = []
    while at < len(runs) and runs[at][0] < pos + n:
        parts.append((max(runs[at][0], pos), min(runs[at][1], pos + n)))
        if runs[at][1] > pos + n:
            break
        at += 1
    return parts, at


def copy_runs(src: str, size: int, runs: list[tuple[int, int]], dst: BinaryIO, *,
              source_hash: str = digests.HASH) -> CopyResult:
    """Copy the byte runs of src (a local path or an fsspec URL of `size` bytes) to dst, then the end-of-archive
    blocks; hash the whole source (with source_hash: the algorithm of its record) and the output (with
    digests.HASH) on the way. ValueError when the source is not `size` bytes long (it changed while it was read).

    Three threads share the work: this one reads chunks and writes their runs, one hashes the source and one the
    output, each hash fed its chunks in order (blake3, hashlib and file I/O release the GIL on large buffers). A
    chunk's buffer is read into again only once both hashes are done with it."""
    _check_runs(runs, size)
    src_hash, out_hash = digests.new(source_hash), digests.new(digests.HASH)
    buffers = _buffers(min(CHUNK, max(size, 1)))
    in_use: deque[list[Future]] = deque()  # per buffer in flight, oldest first: its hashing tasks
    at, pos, written, chunks = 0, 0, 0, 0  # first run not yet wholly written; bytes read; bytes written; chunks read
    flushed = 0  # bytes written that the disk was asked to write (writeback)
    with (ThreadPoolExecutor(1, "dede-hash-src") as hash_src, ThreadPoolExecutor(1, "dede-hash-out") as hash_out,
          open(src, "rb", buffering=0) if not storage.is_url(src) else storage.open_read(src) as f):
        try:
            while pos < size:
                if len(in_use) == BUFFERS:
                    _wait(in_use.popleft())
                buffer = buffers[chunks % BUFFERS]  # the buffer of chunk `chunks - BUFFERS`, hashed by now
                n = f.readinto(buffer[:min(len(buffer), size - pos)])
                if not n:
                    raise ValueError(f"{src} ended early: it changed while it was read; rerun")
                chunk = buffer[:n]
                parts, at = _parts(runs, at, pos, n)
                pieces = [chunk[start - pos:end - pos] for start, end in parts]
                in_use.append([hash_src.submit(src_hash.update, chunk), hash_out.submit(_update, out_hash, pieces)])
                writeback(dst, flushed, written - flushed)  # what the chunks before wrote: their pages are full
                flushed = written
                for piece in pieces:
                    dst.write(piece)
                    written += len(piece)
                pos, chunks = pos + n, chunks + 1
            if f.read(1):
                raise ValueError(f"{src} grew while it was read; rerun")
        finally:
            while in_use:  # the hashes end before their buffers can go (and raise what they raised)
                _wait(in_use.popleft())
    trailer = end_of_archive(written)
    dst.write(trailer)
    out_hash.update(trailer)
    return CopyResult(source_digest=src_hash.hexdigest(), bytes=written + len(trailer), digest=out_hash.hexdigest())


def _sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes, call.restype = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint], ctypes.c_int
    return call


_SYNC_FILE_RANGE = _sync_file_range()


def writeback(dst: BinaryIO, start: int, n: int) -> None:
    """Start writing bytes [start, start + n) of a local dst to disk now, without waiting (Linux
    sync_file_range): the disk writes a shard while the rest of it is copied and hashed, so the fsync that makes
    it durable before its marker finds little left to write. A hint only: the fsync is still what makes the
    shard durable; elsewhere, or for a dst without a file descriptor, nothing is done."""
    if _SYNC_FILE_RANGE is None or n <= 0:
        return
    try:
        fd = dst.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return
    _SYNC_FILE_RANGE(fd, start, n, SYNC_FILE_RANGE_WRITE)  # an error (e.g. a pipe) changes nothing: ignored


def _buffers(size: int) -> list[memoryview]:
    """This thread's BUFFERS chunk buffers of `size` bytes, kept between calls: a new 8 MB buffer costs its
    page faults on every shard (16 ms a shard for three, measured on the 1 GB corpus of bench/clean_speed)."""
    held = getattr(_held, "buffers", None)
    if held is None or len(held[0]) < size:
        held = _held.buffers = [memoryview(bytearray(size)) for _ in range(BUFFERS)]
    return [buffer[:size] for buffer in held]


def _update(digest: Any, pieces: list[memoryview]) -> None:
    for piece in pieces:
        digest.update(piece)


def _wait(tasks: list[Future]) -> None:
    for task in tasks:
        task.result()


class TarSample(NamedTuple):  # a tuple: a shard's index makes thousands of them
    key: str
    spans: list[tuple[int, int]]  # [start, end) of each member: its header blocks and its padded data


@dataclass
class TarIndex:
    samples: list[TarSample] = field(default_factory=list)
    others: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of members that are no sample
    gaps: list[tuple[int, int]] = field(default_factory=list)  # archive-level blocks (pax global headers): kept


def _member_end(m: tarfile.TarInfo) -> int:
    has_data = m.isreg() or m.type not in tarfile.SUPPORTED_TYPES  # the same test tarfile uses to skip data
    return m.offset_data + (-(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if has_data else 0)


def index_tar(path: str) -> TarIndex:
    """Samples of a WebDataset tar as byte spans, grouped as the scorer's source groups them."""
    index = TarIndex()

    def tracked(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        """Every member, noting the archive-level blocks between them (pax global headers) as gaps."""
        prev_end = 0
        for m in tar:
            if m.offset > prev_end:
                index.gaps.append((prev_end, m.offset))
            prev_end = _member_end(m)
            yield m

    def skip(m: tarfile.TarInfo, why: str) -> None:
        index.others.append((clean_key(m.name), f"not a sample: member {m.name!r} {why}"))

    try:
        with tarfile.open(path, mode="r:") as tar:
            for key, group in group_members(tracked(tar), skip):
                index.samples.append(TarSample(clean_key(key), [(m.offset, _member_end(m)) for m in group.values()]))
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{path} is not a readable uncompressed tar shard: {e}") from None
    return index


def recorded_index(shards_dir: str, entry: ShardEntry) -> TarIndex | None:
    """The shard's samples from the spans the shard stage recorded (no tar parsing); None without them."""
    spans = read_spans(shards_dir, entry)
    if spans is None:
        return None
    offsets = spans.offsets
    return TarIndex(samples=[TarSample(key, [(offsets[i], offsets[i + 1])]) for i, key in enumerate(spans.keys)])
