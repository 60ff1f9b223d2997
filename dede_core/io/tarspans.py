"""Byte spans of the samples in a tar shard, and copies of contiguous runs of them.

The shard stage records where each sample lies as it writes the tar (`SpanRecorder`), so clean can copy the
runs of kept samples without parsing the tar again. `copy_runs` copies those runs with the kernel's copy
(os.copy_file_range: no trip through Python for the bytes written) while one sequential read of the source feeds
two sha256 digests, the source's (checked against the manifest) and the output's, each in its own thread
(hashlib releases the GIL). Where the kernel copy is not available (another file system, an fsspec URL) the
runs are written from the buffer that was read for hashing: the output bytes are the same either way.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable

from dede_core.io import storage

CHUNK = 8 << 20  # bytes read (and hashed) at a time: large enough that the per-chunk thread hand-off is noise
# copy_file_range's ways of saying "not here" (old kernels, file systems without it, a cross-device pair).
NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY}


@dataclass(frozen=True)
class CopyResult:
    """What copy_runs read and wrote."""

    source_sha256: str  # hex digest of the whole source, every byte read once
    bytes: int  # bytes written: the runs plus the end-of-archive blocks
    sha256: str  # hex digest of what was written
    kernel_copy: bool  # whether the runs went through os.copy_file_range


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


def copy_runs(src: str, size: int, runs: list[tuple[int, int]], dst: BinaryIO) -> CopyResult:
    """Copy the byte runs of src (a local path or an fsspec URL of `size` bytes) to dst, a local file just
    opened for writing, then the end-of-archive blocks; hash the whole source and the output on the way.
    ValueError when the source is not `size` bytes long (it changed while it was read)."""
    _check_runs(runs, size)
    src_hash, out_hash = hashlib.sha256(), hashlib.sha256()
    local = not storage.is_url(src)
    dst.flush()
    out = _Output(dst.fileno(), kernel=local and hasattr(os, "copy_file_range"))
    buffer = memoryview(bytearray(min(CHUNK, max(size, 1))))
    at, pos = 0, 0  # the first run not yet wholly written; source bytes read
    pool = _hashing_pool()
    with open(src, "rb", buffering=0) if local else storage.open_read(src) as f:
        while pos < size:
            n = f.readinto(buffer[:min(len(buffer), size - pos)])
            if not n:
                raise ValueError(f"{src} ended early: it changed while it was read; rerun")
            chunk = buffer[:n]
            parts, at = _parts(runs, at, pos, n)
            hashing = [pool.submit(src_hash.update, chunk),
                       pool.submit(_update_all, out_hash, [chunk[a - pos:b - pos] for a, b in parts])]
            try:
                for start, end in parts:
                    out.write(f.fileno() if local else -1, start, chunk[start - pos:end - pos])
            finally:
                for done in hashing:
                    done.result()
            pos += n
        if f.read(1):
            raise ValueError(f"{src} grew while it was read; rerun")
    trailer = end_of_archive(out.written)
    _write_all(out.fd, trailer)
    out_hash.update(trailer)
    return CopyResult(source_sha256=src_hash.hexdigest(), bytes=out.written + len(trailer),
                      sha256=out_hash.hexdigest(), kernel_copy=out.kernel and bool(runs))


class _Output:
    """The file being written: runs appended by the kernel's copy while it works, else from the read buffer."""

    def __init__(self, fd: int, *, kernel: bool) -> None:
        self.fd, self.kernel, self.written = fd, kernel, 0

    def write(self, src_fd: int, start: int, data: memoryview) -> None:
        """Append the source's bytes [start, start + len(data)), which `data` holds."""
        if self.kernel:
            try:
                done = 0
                while done < len(data):
                    n = os.copy_file_range(src_fd, self.fd, len(data) - done, start + done)
                    if n == 0:
                        raise ValueError("the source ended early: it changed while it was read; rerun")
                    done += n
                self.written += done
                return
            except OSError as e:
                if e.errno not in NO_KERNEL_COPY:
                    raise
                self.kernel = False
                os.lseek(self.fd, self.written, os.SEEK_SET)  # write the whole part again, from the buffer
                os.ftruncate(self.fd, self.written)
        _write_all(self.fd, data)
        self.written += len(data)


_POOLS: dict[int, ThreadPoolExecutor] = {}  # pid -> its pool: a forked child has none of its parent's threads


def _hashing_pool() -> ThreadPoolExecutor:
    """The process' two hashing threads, started on first use (starting threads per shard costs ms under load)."""
    pid = os.getpid()
    if pid not in _POOLS:
        _POOLS[pid] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dede-hash")
    return _POOLS[pid]


def _update_all(digest: Any, views: list[memoryview]) -> None:
    for view in views:
        digest.update(view)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
