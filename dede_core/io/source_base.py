"""What every corpus source shares: the Sample it hands out, the Source protocol, the key rule, file reads.

A source only lists and reads bytes; decoding happens later (images.py), so an undecodable file still
reaches the scores table with its key. Keys are stable across runs and contain no dots, because the
WebDataset convention splits a member name at the first dot of its basename.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Priority order when a tar sample carries several image members.
TAR_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
ACCEPTED = (
    "an image folder, a .tar shard, a directory of .tar shards, "
    "or a brace pattern like shards/{000000..000003}.tar"
)


@dataclass(frozen=True)
class Sample:
    key: str  # stable and dot-free; the WebDataset __key__ and the `key` column downstream
    data: bytes = field(repr=False)  # original encoded bytes, untouched
    label: int | None  # class index when known
    meta: dict  # {"path": relpath} for folders, the sample's .json for tars; may be empty


@runtime_checkable
class Source(Protocol):
    classes: list[str] | None  # label -> name, when the source knows class names
    skipped: list[tuple[str, str]]  # (key, reason) for entries that could not become samples

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Sample: ...

    def keys(self) -> list[str]: ...


# Lone surrogates: what Python makes of name bytes that are not UTF-8 (os.walk, tarfile use surrogateescape).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(match: re.Match) -> str:
    code = ord(match.group())
    return f"%{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else f"%u{code:04X}"


def clean_key(name: str) -> str:
    """Keys contain no dots (webdataset splits a member name at its first dot) and are valid UTF-8: a name
    byte that is not UTF-8 becomes %XX, since Parquet, hashing and JSON readers refuse lone surrogates."""
    return _SURROGATE.sub(_escape_surrogate, str(name).replace(".", "_"))


def _index(i: int, n: int) -> int:
    i = operator.index(i)
    if not -n <= i < n:
        raise IndexError(f"sample index {i} out of range for a source of {n} samples")
    return i % n


# I/O goes through these two helpers so remote (fsspec) paths can be added in one place.
def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_range(path: str, offset: int, size: int) -> bytes:
    """Up to `size` bytes at `offset`; fewer only at end of file."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
