"""The hash of a whole shard file: BLAKE3 for what dede writes now, sha256 for folders written before (issue #22).

A record names its algorithm (the manifest entry's field is `blake3` or `sha256`), so a folder written by an older
dede keeps being verified with the sha256 it recorded, and a new one is checked at BLAKE3's speed (5,950 MB/s in
one thread against sha256's 1,430 MB/s, measured in issue #22). Both release the GIL on large buffers, so clean
hashes in threads beside its copy.
"""

from __future__ import annotations

import hashlib
from typing import Any

import blake3

HASH = "blake3"  # the algorithm of every record written now
HASHES = ("blake3", "sha256")  # the algorithms a record may name: sha256 for folders written before issue #22


def new(name: str) -> Any:
    """A fresh hash object of the named algorithm (update, hexdigest)."""
    if name == "blake3":
        return blake3.blake3()
    if name == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash {name!r}: a record names one of {', '.join(HASHES)}")


def of(name: str, data: bytes | bytearray | memoryview) -> str:
    """Hex digest of data under the named algorithm."""
    digest = new(name)
    digest.update(data)
    return digest.hexdigest()
