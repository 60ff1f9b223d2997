"""Where samples come from: an image folder or WebDataset tar shards, both as map-style sources.

A source only lists and reads bytes; decoding happens later (images.py), so an undecodable file still
reaches the scores table with its key. Keys are stable across runs and contain no dots, because the
WebDataset convention splits a member name at the first dot of its basename.

This module opens a path as the right source; the parts live beside it (source_base: Sample, Source, the key
rule; image_folder: ImageFolderSource; tar_source: TarShardSource and the member grouping) and are importable
from here as before.
"""

from __future__ import annotations

import os

from braceexpand import braceexpand

from dede_core.io.image_folder import ImageFolderSource
from dede_core.io.source_base import (ACCEPTED, IMAGE_EXTENSIONS, TAR_IMAGE_EXTENSIONS, Sample, Source,  # noqa: F401
                                      _SURROGATE, _escape_surrogate, _index, _read_file, _read_range, clean_key)
from dede_core.io.tar_source import TarShardSource, _TarEntry, group_members, split_member  # noqa: F401


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
