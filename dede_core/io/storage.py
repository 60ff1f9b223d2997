"""Where a stage folder lives: a local path or an fsspec URL (s3://bucket/run/scores, gs://..., memory://...).

Local folders keep the stage's own discipline (temporary name, fsync, rename). An object store has no rename:
there a file is written locally first and sent in one upload (a single PUT, or a multipart upload completed at
the end), so the object appears whole or not at all; a shard's completion marker is still sent after its file.
Readers that need random access (tar shards) get a local copy: the shard is the unit of work, so a task
downloads the shards it scores or cleans and nothing else. The endpoint and credentials come from fsspec's
usual configuration (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..., or FSSPEC_S3_* variables).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from types import TracebackType
from typing import IO, Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs


def is_url(path: str | os.PathLike) -> bool:
    """True for an fsspec URL (scheme://...), False for a local path."""
    return "://" in os.fspath(path)


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, path inside it) for a URL."""
    return url_to_fs(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute; a URL as given, without a trailing slash."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(folder: str, *names: str) -> str:
    return posixpath.join(folder, *names) if is_url(folder) else os.path.join(folder, *names)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, inner = filesystem(path)
    return fs.isfile(inner)


def isdir(path: str) -> bool:
    """A local folder; for a URL, a prefix holding at least one object (object stores have no empty folders)."""
    if not is_url(path):
        return os.path.isdir(path)
    fs, inner = filesystem(path)
    return fs.isdir(inner)


def getsize(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    fs, inner = filesystem(path)
    return int(fs.size(inner))


def listdir(path: str) -> list[str]:
    """Names directly inside a folder (files and sub-folders); [] for a URL prefix holding nothing."""
    if not is_url(path):
        return os.listdir(path)
    fs, inner = filesystem(path)
    try:
        entries = fs.ls(inner, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return [posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != inner.rstrip("/")]


def makedirs(path: str) -> None:
    """Create a local folder; nothing for a URL (an object's prefix exists once the object does)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def unlink(path: str) -> None:
    if not is_url(path):
        os.unlink(path)
        return
    fs, inner = filesystem(path)
    fs.rm_file(inner)


def open_read(path: str, mode: str = "rb") -> IO[Any]:
    if not is_url(path):
        return open(path, mode, encoding=None if "b" in mode else "utf-8")
    fs, inner = filesystem(path)
    return fs.open(inner, mode)


def read_json(path: str) -> Any:
    with open_read(path, "r") as f:
        return json.load(f)


def scratch(folder: str) -> tempfile.TemporaryDirectory | None:
    """A local temporary folder for files bound for a URL folder; None for a local folder (temp files go
    next to their final name there, so the rename stays on one file system)."""
    return tempfile.TemporaryDirectory(prefix="dede-") if is_url(folder) else None


def publish(local_tmp: str, dest: str) -> None:
    """Make a finished temporary file the file `dest`: a rename locally, one upload to a URL (the object
    appears whole). The temporary file is gone afterwards either way."""
    if not is_url(dest):
        os.replace(local_tmp, dest)
        return
    fs, inner = filesystem(dest)
    try:
        fs.put_file(local_tmp, inner)
    finally:
        os.unlink(local_tmp)


class AtomicFile:
    """A file that appears at `dest` whole or not at all: the one atomic write every stage uses.

    Writes go to a temporary `.NAME.XXXX.tmp`: next to `dest` for a local folder (so the rename stays on one file
    system), in `scratch` (or the system temp folder) for a URL. commit() flushes, fsyncs, makes it readable by
    others (0644) and renames it into place, or uploads it in one piece; abort() or an exception deletes it.
    As a context manager it yields the open binary file and commits when the block ends without an exception."""

    def __init__(self, dest: str | os.PathLike, *, scratch: str | None = None) -> None:
        self.dest = os.fspath(dest)
        folder = scratch if is_url(self.dest) else os.path.dirname(os.path.abspath(self.dest))
        fd, self.tmp = tempfile.mkstemp(prefix=f".{basename(self.dest)}.", suffix=".tmp", dir=folder)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def seal(self) -> None:
        """Flush, fsync and close the temporary, readable by others: ready to become `dest`."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, 0o644)  # mkstemp makes 0600; stage outputs are shared data

    def commit(self) -> None:
        try:
            self.seal()
            publish(self.tmp, self.dest)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self) -> BinaryIO:
        return self.file

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    """`data` at `dest`, whole or not at all (AtomicFile)."""
    with AtomicFile(dest) as f:
        f.write(data)


def write_json(dest: str | os.PathLike, data: Any) -> None:
    """Indented, key-sorted JSON at `dest`, whole or not at all."""
    write_bytes(dest, _json_bytes(data))


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_parquet(dest: str | os.PathLike, table: Any) -> None:
    """A pyarrow Table as Parquet at `dest`, whole or not at all."""
    import pyarrow.parquet as pq

    with AtomicFile(dest) as f:
        pq.write_table(table, f)


def create_once(dest: str, data: Any) -> bool:
    """Write JSON `data` at `dest` only if nothing is there; True when this call created it. Locally a hard link
    makes it first-writer-wins among parallel workers; at a URL (no exclusive create) the last put wins, so
    callers make it from one task before the parallel ones start."""
    if is_url(dest):
        if isfile(dest):
            return False
        write_json(dest, data)
        return True
    holder = AtomicFile(f"{dest}.claim")  # a temporary beside dest: the link stays on one file system
    try:
        holder.file.write(_json_bytes(data))
        holder.seal()
        os.link(holder.tmp, dest)
        return True
    except FileExistsError:
        return False
    finally:
        holder.abort()


TEMPORARY = re.compile(r"\..+\.tmp|.+\.\d+\.tmp")  # .NAME.XXXX.tmp (mkstemp) and NAME.PID.tmp


def sweep_temporaries(folder: str, subfolders: tuple[str, ...] = ()) -> list[str]:
    """Delete the temporary files a killed run left in a local folder (and its subfolders); returns their
    names. Call it where a stage starts, before its parallel tasks: a live writer's temporary would go too."""
    if is_url(folder):
        return []  # at a URL temporaries are written locally, never in the folder
    gone = []
    for where in [folder] + [os.path.join(folder, s) for s in subfolders]:
        for name in os.listdir(where) if os.path.isdir(where) else []:
            if TEMPORARY.fullmatch(name) and os.path.isfile(os.path.join(where, name)):
                os.unlink(os.path.join(where, name))
                gone.append(name)
    return gone


def local_copy(path: str, folder: str) -> str:
    """A local path to read `path` from: the path itself, or a copy downloaded into `folder` for a URL."""
    if not is_url(path):
        return path
    fs, inner = filesystem(path)
    local = os.path.join(folder, posixpath.basename(inner))
    fs.get_file(inner, local)
    return local

