"""What a shards folder was made from: one row per live source sample, with its name and fingerprint.

`dede shard` rerun over the same SRC compares the corpus as it is now with this index: a sample whose file
has the same size and mtime is unchanged without reading it; otherwise its bytes are hashed (sha256) and
compared. New and changed samples go into new shards after the existing ones; removed and changed samples
are retired (listed in the manifest's `retired` with the shard that still holds them), so the clean stage
drops them. The index lives next to the manifest as `source-NNNNNN.parquet` (one per update, named and
hashed by the manifest, so a killed update never pairs a manifest with the wrong index).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dede_core.io import storage
from dede_core.io.sources import TarShardSource

SCHEMA = pa.schema([
    pa.field("key", pa.string()),  # the sample key (WebDataset __key__)
    pa.field("item", pa.string()),  # its source reference: relative path, "FILE#row=N", "TAR#MEMBER"
    pa.field("shard", pa.string()),  # the shard that holds its current version
    pa.field("size", pa.int64()),  # size of the file it was read from (null when unknown)
    pa.field("mtime_ns", pa.int64()),  # modification time of that file (null when unknown: bytes are hashed)
    pa.field("sha256", pa.string()),  # hex digest of the image bytes
])
REMOVED, CHANGED = "source_removed", "source_changed"  # reasons a sharded sample is retired


@dataclass(frozen=True)
class Entry:
    item: str | None
    shard: str
    size: int | None
    mtime_ns: int | None
    sha256: str


@dataclass
class Changes:
    """What one `dede shard` call found in the source against the existing shards, and what it wrote."""

    added: list[str] = field(default_factory=list)  # keys new to the shards
    changed: list[str] = field(default_factory=list)  # keys whose bytes changed: old version retired
    removed: list[str] = field(default_factory=list)  # keys gone from the source: retired
    unchanged: int = 0
    new_shards: list[str] = field(default_factory=list)  # shards written by this call

    def summary(self) -> dict[str, Any]:
        return {"added": len(self.added), "changed": len(self.changed), "removed": len(self.removed),
                "unchanged": self.unchanged, "new_shards": list(self.new_shards)}

    def text(self) -> str:
        s = self.summary()
        return (f"{s['added']} added, {s['changed']} changed, {s['removed']} removed, {s['unchanged']} unchanged; "
                f"{len(self.new_shards)} new shard(s)")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_stat(path: str) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of a local file or URL; None where the file system does not say."""
    if not storage.is_url(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    fs, inner = storage.filesystem(path)
    info = fs.info(inner)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    stamp = getattr(mtime, "timestamp", None)
    ns = int(stamp() * 1e9) if stamp else (int(float(mtime) * 1e9) if isinstance(mtime, (int, float)) else None)
    return info.get("size"), ns


def read_table(out_dir: str, ref: dict[str, Any] | None, columns: list[str] | None = None) -> pa.Table | None:
    """The index a manifest names as an Arrow table (those columns); None when it has none or the file is
    missing or altered."""
    if not ref:
        return None
    path = storage.join(out_dir, ref["file"])
    if not storage.isfile(path):
        return None
    with storage.open_read(path) as f:
        data = f.read()
    if sha256(data) != ref.get("sha256"):
        return None
    return pq.read_table(pa.BufferReader(data), columns=columns)


def read(out_dir: str, ref: dict[str, Any] | None) -> dict[str, Entry] | None:
    """The index a manifest names (key -> Entry); None when it has none or the file is missing or altered."""
    table = read_table(out_dir, ref)
    if table is None:
        return None
    cols = [table.column(n).to_pylist() for n in SCHEMA.names]
    return {k: Entry(i, s, z, m, h) for k, i, s, z, m, h in zip(*cols)}


def from_shards(out_dir: str, shard_names: list[str], retired: set[tuple[str, str]]) -> dict[str, Entry]:
    """An index rebuilt from the shards themselves (a folder made before the index existed, or whose index
    was lost): every live sample with the sha256 of its stored bytes; the source is then hashed in full."""
    index: dict[str, Entry] = {}
    scratch = storage.scratch(out_dir)
    try:
        for name in shard_names:
            src = TarShardSource([storage.local_copy(storage.join(out_dir, name), scratch.name if scratch else "")])
            for i, key in enumerate(src.keys()):
                if (name, key) not in retired:
                    index[key] = Entry(None, name, None, None, sha256(src[i].data))
    finally:
        if scratch:
            scratch.cleanup()
    return index


def write(out_dir: str, index: dict[str, Entry], generation: int) -> dict[str, Any]:
    """Write OUT/source-NNNNNN.parquet (temporary name, rename); returns the manifest's reference to it."""
    keys = sorted(index)
    columns = [keys] + [[getattr(index[k], n) for k in keys] for n in SCHEMA.names[1:]]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA)],
                                        schema=SCHEMA), sink)
    data = sink.getvalue().to_pybytes()
    name = f"source-{generation:06d}.parquet"
    storage.write_bytes(storage.join(out_dir, name), data)
    return {"file": name, "sha256": sha256(data), "items": len(keys), "generation": generation}
