"""Shard digests (issue #22): new folders record BLAKE3, folders written before keep being verified with sha256;
either way clean checks every source byte against the record, and cleans exactly the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from dede_core.io import digests
from dede_core.stages.clean import clean
from dede_core.stages.select import Rule
from dede_core.stages.shard import write_shards
from schemas.manifest import read_manifest, read_spans
from test_select import png, row, write_scores

T = 500.0


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, Path]:
    """Two shards written by the shard stage (spans recorded), a score per sample; samples 3 and 9 above T."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        (images / f"img{i:02d}.png").write_bytes(png(i))
    shards = tmp_path / "shards"
    write_shards(str(images), str(shards), samples_per_shard=6, progress=False)
    rows = []
    for entry in read_manifest(shards).shards:
        for position, key in enumerate(read_spans(shards, entry).keys):
            rows.append(row(key, entry.name, position, 900.0 if position == 3 else 100.0 + position))
    write_scores(str(tmp_path / "scores"), rows)
    return shards, tmp_path / "scores"


def as_before_blake3(shards: Path, to: Path) -> Path:
    """A copy of the shards folder as dede wrote it before issue #22: sha256 records, no `hash` field."""
    shutil.copytree(shards, to)
    manifest = json.loads((to / "manifest.json").read_text())
    del manifest["hash"]
    for entry in manifest["shards"]:
        del entry["blake3"]
        entry["sha256"] = hashlib.sha256((to / entry["name"]).read_bytes()).hexdigest()
        spans = to / (entry["name"][:-4] + ".spans.json")
        data = json.loads(spans.read_text())
        data.pop("blake3")
        spans.write_text(json.dumps(data | {"sha256": entry["sha256"]}))
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def test_new_folders_record_blake3(corpus):
    shards, _ = corpus
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["hash"] == "blake3"
    for entry in read_manifest(shards).shards:
        assert entry.hash == "blake3" and entry.sha256 is None
        assert entry.digest == digests.of("blake3", (shards / entry.name).read_bytes())
    assert "sha256" not in manifest["shards"][0]


def test_an_old_sha256_folder_still_verifies_and_cleans_exactly(corpus, tmp_path):
    shards, scores = corpus
    old = as_before_blake3(shards, tmp_path / "old-shards")
    entries = read_manifest(old).shards
    assert read_manifest(old).hash == "sha256" and all(e.hash == "sha256" for e in entries)
    assert all(read_spans(old, e) is not None for e in entries)  # the old spans files are still used
    clean(shards, scores, tmp_path / "new-out", Rule.threshold(T), progress=False)
    clean(old, scores, tmp_path / "old-out", Rule.threshold(T), progress=False)
    for entry in entries:
        assert (tmp_path / "old-out" / entry.name).read_bytes() == (tmp_path / "new-out" / entry.name).read_bytes()
    out = read_manifest(tmp_path / "old-out")  # what clean writes is recorded with BLAKE3
    assert out.hash == "blake3" and out.shards == read_manifest(tmp_path / "new-out").shards
    for entry in out.shards:
        assert entry.digest == digests.of("blake3", (tmp_path / "old-out" / entry.name).read_bytes())
    # A rerun of the same command on the old folder resumes as before: nothing is cleaned again.
    assert clean(old, scores, tmp_path / "old-out", Rule.threshold(T), progress=False).written == []


@pytest.mark.parametrize("era", ["blake3", "sha256"])
def test_a_corrupted_source_shard_of_the_same_size_is_refused(corpus, tmp_path, era):
    shards, scores = corpus
    if era == "sha256":
        shards = as_before_blake3(shards, tmp_path / "old-shards")
    path = shards / read_manifest(shards).shards[1].name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # same size; the mtime put back: only the bytes tell
    stat = os.stat(path)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match=f"does not match the {era} in its manifest"):
        clean(shards, scores, tmp_path / "out", Rule.threshold(T), progress=False)
    assert not (tmp_path / "out" / path.name).exists() and not (tmp_path / "out" / "manifest.json").exists()
