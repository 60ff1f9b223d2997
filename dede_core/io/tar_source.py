"""WebDataset tar shards as a source, and the member grouping every reader of shards shares (WebDataset's)."""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from dede_core.io.source_base import (ACCEPTED, TAR_IMAGE_EXTENSIONS, Sample, _SURROGATE, _escape_surrogate, _index,
                                      _read_range, clean_key)


@dataclass(frozen=True)
class _TarEntry:
    shard: str
    offset: int  # TarInfo.offset_data of the image member
    size: int
    label: int | None
    meta: dict
    member: str  # the image member's name in the tar


def split_member(name: str) -> tuple[str, str] | None:
    """WebDataset convention: key = name up to the first dot of the basename, ext = the rest."""
    while name.startswith("./"):
        name = name[2:]
    dirname, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{dirname}/{stem}" if dirname else stem), ext.lower()


def group_members(members: Iterable[tarfile.TarInfo],
                  skip: Callable[[tarfile.TarInfo, str], None]) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """WebDataset's grouping: (raw key, {ext: member} in member order) per sample.

    Regular members named <key>.<ext> group while consecutive; a repeated extension starts a new sample.
    Directories are passed over; any other member goes to skip(member, why). Every reader of shards (the
    scorer's source, clean, the report) must group alike so that keys match from ingest to cleaned output.
    """
    key, group = None, {}
    for member in members:
        if member.isdir():
            continue
        parsed = split_member(member.name)
        if not member.isreg() or parsed is None:
            skip(member, "not a regular file" if not member.isreg() else "name is not <key>.<ext>")
            continue
        if parsed[0] != key or parsed[1] in group:
            if key is not None:
                yield key, group
            key, group = parsed[0], {}
        group[parsed[1]] = member
    if key is not None:
        yield key, group


class TarShardSource:
    """WebDataset tar shards, indexed once; random access seeks straight to each image member."""

    def __init__(self, shards: list[str]) -> None:
        if not shards:
            raise ValueError(f"no .tar shards given; expected {ACCEPTED}")
        self.shards = list(shards)
        self.classes: list[str] | None = None  # .cls holds indices only; names are not in the shards
        self.skipped: list[tuple[str, str]] = []
        self._keys: list[str] = []
        self._entries: list[_TarEntry] = []
        self._first_seen: dict[str, str] = {}
        for shard in self.shards:
            self._index_shard(shard)

    def _index_shard(self, shard: str) -> None:
        try:
            with tarfile.open(shard, mode="r:") as tar:
                def skip(member: tarfile.TarInfo, why: str) -> None:
                    self.skipped.append((clean_key(member.name), f"{shard}: member {member.name!r} {why}"))

                for key, group in group_members(tar, skip):
                    self._add(tar, shard, key, group)
                end = tar.offset
        except (tarfile.TarError, EOFError) as e:
            raise ValueError(f"{shard} is not a readable uncompressed tar shard: {e}") from None
        # tarfile stops quietly at a cut-off header, so check for the zero block that ends every
        # complete archive; without it the shard was truncated and members are missing.
        if _read_range(shard, end, tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise ValueError(f"{shard} is truncated (no end-of-archive block after offset {end}); rewrite it")

    def _add(self, tar: tarfile.TarFile, shard: str, key: str, group: dict) -> None:
        key = clean_key(key)
        image_ext = next((ext for ext in TAR_IMAGE_EXTENSIONS if ext in group), None)
        reason = None
        if key in self._first_seen:
            reason = f"duplicate key (first seen in {self._first_seen[key]})"
        elif image_ext is None:
            reason = f"no image member ({'/'.join(TAR_IMAGE_EXTENSIONS)}); found: {', '.join(sorted(group))}"
        if reason is None:
            label, meta, reason = self._read_label_meta(tar, group)
        if reason is not None:
            self.skipped.append((key, f"{shard}: {reason}"))
            return
        image = group[image_ext]
        self._first_seen[key] = shard
        self._keys.append(key)
        self._entries.append(_TarEntry(shard, image.offset_data, image.size, label, meta, image.name))

    @staticmethod
    def _read_label_meta(tar: tarfile.TarFile, group: dict) -> tuple[int | None, dict, str | None]:
        """(label, meta, None) or (None, {}, reason): a bad .cls/.json means the sample is not what we think."""
        label, meta = None, {}
        if "cls" in group:
            text = tar.extractfile(group["cls"]).read()
            try:
                label = int(text.decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                return None, {}, f"unreadable .cls label {text[:20]!r}"
        if "json" in group:
            try:
                meta = json.loads(tar.extractfile(group["json"]).read())
            except (UnicodeDecodeError, ValueError) as e:
                return None, {}, f"unreadable .json: {e}"
            if not isinstance(meta, dict):
                return None, {}, f".json is a {type(meta).__name__}, expected an object"
        return label, meta, None

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> Sample:
        i = _index(i, len(self._entries))
        e = self._entries[i]
        data = _read_range(e.shard, e.offset, e.size)
        if len(data) != e.size:
            raise OSError(f"{e.shard}: {len(data)} of {e.size} bytes at offset {e.offset}; shard changed since open")
        return Sample(key=self._keys[i], data=data, label=e.label, meta=dict(e.meta))

    def keys(self) -> list[str]:
        return list(self._keys)

    def item(self, i: int) -> tuple[str, str]:
        """(TAR#MEMBER: the tar and its image member, the shard file whose size and mtime fingerprint it)."""
        e = self._entries[_index(i, len(self._entries))]
        return _SURROGATE.sub(_escape_surrogate, f"{os.path.basename(e.shard)}#{e.member}"), e.shard

    def meta(self, i: int) -> dict:
        """The sample's .json (read when the shard was indexed), without reading its image."""
        return dict(self._entries[_index(i, len(self._entries))].meta)
