"""Where samples come from: an image folder or WebDataset tar shards, both as map-style sources.

A source only lists and reads bytes; decoding happens later (images.py), so an undecodable file still
reaches the scores table with its key. Keys are stable across runs and contain no dots, because the
WebDataset convention splits a member name at the first dot of its basename.
"""

from __future__ import annotations

import json
import operator
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, runtime_checkable

from braceexpand import braceexpand

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


class ImageFolderSource:
    """Images under a directory, recursively; the top-level subfolder names the class.

    Links are followed only while their target stays inside the root (a folder assembled from symlinked subsets
    works); a link leading outside it is listed in `skipped` unless follow_external_links. A directory named
    like an image, a broken link and a link loop are listed in `skipped` too: nothing is read from outside SRC
    unless asked, and nothing is left out silently.
    """

    def __init__(self, root: str, *, follow_external_links: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.skipped: list[tuple[str, str]] = []
        rels = self._walk(os.path.realpath(self.root), follow_external_links)
        if not rels:
            raise ValueError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) found under {root}; expected {ACCEPTED}")
        rels.sort()
        self._paths = rels
        self._keys = [clean_key(os.path.splitext(rel)[0]) for rel in rels]
        self._check_unique()
        top = [rel.split("/", 1)[0] if "/" in rel else None for rel in rels]
        names = sorted({t for t in top if t is not None})
        self.classes: list[str] | None = names or None
        index = {name: i for i, name in enumerate(names)}
        self._labels = [None if t is None else index[t] for t in top]

    def _skip(self, rel: str, reason: str) -> None:
        self.skipped.append((clean_key(os.path.splitext(rel)[0]), f"{rel}: {reason}"))

    def _outside(self, path: str, real_root: str) -> bool:
        return os.path.commonpath([os.path.realpath(path), real_root]) != real_root

    def _walk(self, real_root: str, follow_external: bool) -> list[str]:
        """Relative paths of the image files, listing in `skipped` what is passed over and why."""
        rels = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            for name in sorted(dirnames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    self._skip(rel, "a directory named like an image (its files are read one by one)")
                real = os.path.realpath(full)
                why = None
                if os.path.islink(full) and self._outside(full, real_root) and not follow_external:
                    why = f"link to {real}, outside the source root (pass --follow-external-links to read it)"
                elif os.path.islink(full) and os.path.commonpath([real, os.path.realpath(dirpath)]) == real:
                    why = f"link loop: {real} holds this link"
                if why:
                    self._skip(rel, why)
                    dirnames.remove(name)
            for name in filenames:
                if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                if os.path.islink(full):
                    if not os.path.exists(full):
                        self._skip(rel, f"broken link to {os.readlink(full)}")
                        continue
                    if not os.path.isfile(full):
                        self._skip(rel, "link to something that is not a file")
                        continue
                    if self._outside(full, real_root) and not follow_external:
                        self._skip(rel, f"link to {os.path.realpath(full)}, outside the source root (pass "
                                        f"--follow-external-links to read it)")
                        continue
                elif not os.path.isfile(full):
                    self._skip(rel, "not a regular file")
                    continue
                rels.append(rel)
        return rels

    def _check_unique(self) -> None:
        by_key: dict[str, list[str]] = {}
        for key, rel in zip(self._keys, self._paths):
            by_key.setdefault(key, []).append(rel)
        clashes = {k: v for k, v in by_key.items() if len(v) > 1}
        if clashes:
            shown = "; ".join(f"{k!r}: {', '.join(v)}" for k, v in list(clashes.items())[:10])
            raise ValueError(
                f"{len(clashes)} sample key collision(s) under {self.root} (keys drop the extension and "
                f"replace '.' with '_'); rename or remove one file of each group: {shown}"
            )

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i: int) -> Sample:
        i = _index(i, len(self._paths))
        rel = self._paths[i]
        data = _read_file(os.path.join(self.root, rel))
        return Sample(key=self._keys[i], data=data, label=self._labels[i], meta={"path": rel})

    def keys(self) -> list[str]:
        return list(self._keys)

    def item(self, i: int) -> tuple[str, str]:
        """(the sample's name in the source, the file whose size and mtime fingerprint it)."""
        rel = self._paths[_index(i, len(self._paths))]
        return _SURROGATE.sub(_escape_surrogate, rel), os.path.join(self.root, rel)


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


def _open_dir(path: str, follow_external_links: bool = False) -> Source:
    entries = sorted(os.listdir(path))
    tars = [os.path.join(path, n) for n in entries if n.lower().endswith(".tar")]
    tars = [t for t in tars if os.path.isfile(t)]
    if not tars:
        return ImageFolderSource(path, follow_external_links=follow_external_links)
    images = [n for n in entries if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    if images:
        raise ValueError(
            f"{path} holds both .tar shards and images (e.g. {images[0]}); "
            f"point at a folder with only one kind: {ACCEPTED}"
        )
    return TarShardSource(tars)


def open_source(path: str, *, follow_external_links: bool = False) -> Source:
    """A local path -> Source: image folder, one .tar, a directory of .tar files, or a brace pattern.
    follow_external_links: read an image folder's links whose target lies outside it (trusted corpora only)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a string, got {type(path).__name__}; expected {ACCEPTED}")
    path = os.fspath(path)
    if "{" in path and not os.path.exists(path):
        shards = list(braceexpand(path))
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(shards)} shard(s) from {path} do not exist, e.g. {missing[0]}"
            )
        not_tar = [s for s in shards if not s.lower().endswith(".tar")]
        if not_tar:
            raise ValueError(f"brace pattern {path} must expand to .tar files, got e.g. {not_tar[0]}")
        return TarShardSource(shards)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or directory: {path}")
    if os.path.isdir(path):
        return _open_dir(path, follow_external_links)
    if path.lower().endswith(".tar"):
        return TarShardSource([path])
    raise ValueError(f"cannot read {path}: expected {ACCEPTED} (compressed .tar.gz shards are not seekable)")
