"""Sample images read back from a shards folder by key, for the pages that show them (report.html, `dede sql
--html`, the review app): a seek per sample where the shard stage recorded its spans, else a scan of the tar."""

from __future__ import annotations

import io
import tarfile

from dede_core.io import storage
from dede_core.io.sources import TAR_IMAGE_EXTENSIONS, clean_key, split_member
from schemas.manifest import read_manifest, read_spans


def _image_member(tar: tarfile.TarFile, left: set[str], found: dict[str, bytes]) -> None:
    """Move the image of each sample of `tar` whose key is in `left` into `found`, until none is left."""
    for member in tar:
        parsed = split_member(member.name) if member.isreg() else None
        if parsed is None or parsed[1] not in TAR_IMAGE_EXTENSIONS:
            continue
        key = clean_key(parsed[0])
        if key in left:
            found[key] = tar.extractfile(member).read()
            left.discard(key)
            if not left:
                break


def read_images(shards_dir: str, wanted: dict[str, set[str]]) -> dict[str, bytes]:
    """{key: image bytes} for the wanted keys of each shard: each sample's own bytes where the shard stage
    recorded its spans (a seek per sample), else read member by member until all are found."""
    found: dict[str, bytes] = {}
    try:
        entries = {e.name: e for e in read_manifest(shards_dir).shards}
    except (OSError, ValueError):
        entries = {}
    for shard, keys in wanted.items():
        path = storage.join(shards_dir, shard)
        if not storage.isfile(path):
            continue
        left = set(keys)
        spans = read_spans(shards_dir, entries[shard]) if shard in entries else None
        if spans is not None:
            at = [i for i, key in enumerate(spans.keys) if key in left]
            with storage.open_read(path) as f:
                for i in at:
                    f.seek(spans.offsets[i])
                    data = f.read(spans.offsets[i + 1] - spans.offsets[i])
                    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                        _image_member(tar, {spans.keys[i]}, found)
            continue
        with storage.open_read(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            _image_member(tar, left, found)
    return found
