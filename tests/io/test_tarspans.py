"""Recorded sample spans and the run copy: the same spans as parsing the tar, the same bytes as a buffered copy."""

from __future__ import annotations

import io
import json
import os
import tarfile

import shutil

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dede_core.io import digests
from dede_core.io import tarspans
from dede_core.io.tarspans import copy_runs, end_of_archive, merge_runs
from dede_core.io.tarspans import index_tar, recorded_index
from dede_core.stages.clean import clean
from dede_core.stages.select import Rule
from dede_core.stages.shard import write_shards
from schemas.manifest import read_manifest, read_spans, spans_path
from schemas.tables import SCORES, with_metadata


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of PNGs of different sizes (so the spans differ), with .cls and .json members."""
    root = tmp_path_factory.mktemp("spans")
    rng = np.random.default_rng(0)
    for i in range(23):
        folder = root / "images" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        side = 8 + 3 * i
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    write_shards(str(root / "images"), str(root / "shards"), samples_per_shard=10, progress=False)
    return root / "shards"


def test_recorded_spans_are_the_parsed_ones(shards):
    manifest = read_manifest(shards)
    assert len(manifest.shards) == 3
    for entry in manifest.shards:
        recorded, parsed = recorded_index(str(shards), entry), index_tar(str(shards / entry.name))
        assert [s.key for s in recorded.samples] == [s.key for s in parsed.samples]
        assert [s.spans for s in recorded.samples] == [merge_runs(s.spans) for s in parsed.samples]
        assert parsed.gaps == [] and parsed.others == []


def test_a_spans_file_that_does_not_match_its_shard_is_ignored(shards, tmp_path):
    entry = read_manifest(shards).shards[0]
    data = json.loads(open(spans_path(shards, entry.name)).read())
    assert read_spans(shards, entry) is not None
    for change in ({"sha256": "0" * 64}, {"bytes": data["bytes"] + 512}, {"offsets": data["offsets"][:-1]},
                   {"offsets": [512] + data["offsets"][1:]}, {"keys": data["keys"][::-1]}, {"format": "other/1"}):
        (tmp_path / spans_path("", entry.name)).write_text(json.dumps(data | change))
        assert read_spans(tmp_path, entry) is None, change
    (tmp_path / spans_path("", entry.name)).write_text("{not json")
    assert read_spans(tmp_path, entry) is None
    assert read_spans(tmp_path / "absent", entry) is None


def _copy(src: str, runs: list[tuple[int, int]], tmp_path, name: str, size: int | None = None
          ) -> tuple[bytes, tarspans.CopyResult]:
    path = tmp_path / name
    with open(path, "wb") as f:
        result = copy_runs(src, os.path.getsize(src) if size is None else size, runs, f)
    return path.read_bytes(), result


def expected(data: bytes, runs: list[tuple[int, int]]) -> bytes:
    body = b"".join(data[a:b] for a, b in runs)
    return body + end_of_archive(len(body))


@pytest.mark.parametrize("chunk", [tarspans.CHUNK, 1000])  # 1000: runs and blocks cross chunk borders
def test_copy_runs_writes_the_runs_and_an_end_of_archive(shards, tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(tarspans, "CHUNK", chunk)
    entry = read_manifest(shards).shards[1]
    src = str(shards / entry.name)
    data = open(src, "rb").read()
    samples = recorded_index(str(shards), entry).samples
    runs = merge_runs([span for i, s in enumerate(samples) if i not in (0, 4, 5) for span in s.spans])
    assert len(runs) == 2
    out, result = _copy(src, runs, tmp_path, "out.tar")
    assert out == expected(data, runs)
    assert result.source_digest == entry.digest and result.digest == digests.of(digests.HASH, out)
    assert result.bytes == len(out) and len(out) % tarfile.RECORDSIZE == 0
    with tarfile.open(tmp_path / "out.tar") as tar:  # a valid tar of the kept samples only
        assert {m.name.split(".")[0] for m in tar} == {s.key for i, s in enumerate(samples) if i not in (0, 4, 5)}


def test_a_url_source_is_copied_through_the_buffer(shards, tmp_path):
    entry = read_manifest(shards).shards[2]
    data = (shards / entry.name).read_bytes()
    with fsspec.open("memory://spans/shard.tar", "wb") as f:
        f.write(data)
    runs = [(0, 1024), (2048, 3072)]
    out, result = _copy("memory://spans/shard.tar", runs, tmp_path, "out.tar", len(data))
    assert out == expected(data, runs) and result.source_digest == entry.digest


class _ShortReads(io.RawIOBase):
    """A stream that hands out at most 333 bytes a read, as network streams may."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), 333, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def test_short_reads_and_many_chunks_in_flight_copy_the_same_bytes(shards, tmp_path, monkeypatch):
    # Each chunk's buffer is read into again only after both hashes are done with it: with 1000-byte chunks
    # filled 333 bytes at a time, every buffer is reused many times over while the hashes run behind.
    monkeypatch.setattr(tarspans, "CHUNK", 1000)
    entry = read_manifest(shards).shards[1]
    data = (shards / entry.name).read_bytes()
    monkeypatch.setattr(tarspans.storage, "open_read", lambda url: _ShortReads(data))
    samples = recorded_index(str(shards), entry).samples
    runs = merge_runs([span for i, s in enumerate(samples) if i % 2 for span in s.spans])
    out, result = _copy("memory://short/shard.tar", runs, tmp_path, "out.tar", len(data))
    assert out == expected(data, runs)
    assert result.source_digest == entry.digest and result.digest == digests.of(digests.HASH, out)


def test_everything_dropped_is_an_empty_archive(shards, tmp_path):
    src = str(shards / read_manifest(shards).shards[0].name)
    out, result = _copy(src, [], tmp_path, "empty.tar")
    assert out == bytes(tarfile.RECORDSIZE) == end_of_archive(0)
    with tarfile.open(tmp_path / "empty.tar") as tar:
        assert tar.getmembers() == []


def test_a_source_of_another_size_and_bad_runs_are_refused(shards, tmp_path):
    src = str(shards / read_manifest(shards).shards[0].name)
    size = os.path.getsize(src)
    for wrong in (size - 512, size + 512):
        with open(tmp_path / "out.tar", "wb") as f, pytest.raises(ValueError, match="changed while it was read|grew"):
            copy_runs(src, wrong, [(0, 512)], f)
    for runs in ([(512, 0)], [(0, 1024), (512, 2048)], [(0, size + 1)]):
        with open(tmp_path / "out.tar", "wb") as f, pytest.raises(ValueError, match="sorted, disjoint"):
            copy_runs(src, size, runs, f)


def test_merge_runs_joins_touching_spans():
    assert merge_runs([(10, 20), (0, 10), (30, 40), (20, 25)]) == [(0, 25), (30, 40)]
    assert merge_runs([]) == []


def write_scores(shards, scores, drop_every: int) -> None:
    """A scores file per shard (SCORES schema) from the spans' keys: every drop_every-th sample scores 1000."""
    os.makedirs(scores)
    for entry in read_manifest(shards).shards:
        keys = read_spans(shards, entry).keys
        rows = [{"key": k, "shard": entry.name, "position": i, "status": "ok", "score": 1000.0 if i % drop_every == 0
                 else 1.0, "draws": 1, "detector_hash": "d", "encoder_id": "e"} for i, k in enumerate(keys)]
        schema = with_metadata(SCORES, "scores", "{}")
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(scores, entry.name[:-4] + ".parquet"))


def test_clean_writes_the_same_bytes_with_and_without_recorded_spans(shards, tmp_path, monkeypatch):
    """The recorded spans (no tar parsing) and parsing the tar give byte-identical cleaned folders."""
    import dede_core.stages.clean as clean_stage
    import dede_core.stages.clean_shard as clean_shard

    write_scores(shards, tmp_path / "scores", drop_every=3)
    with monkeypatch.context() as m:  # the recorded spans are used: the tar is not parsed
        for module in (clean_stage, clean_shard):
            m.setattr(module, "index_tar", lambda path: pytest.fail(f"{path} was parsed"))
        clean(str(shards), str(tmp_path / "scores"), str(tmp_path / "fast"), Rule.threshold(500), progress=False)
    parsed = tmp_path / "parsed"
    shutil.copytree(shards, parsed, ignore=shutil.ignore_patterns("*.spans.json"))
    clean(str(parsed), str(tmp_path / "scores"), str(tmp_path / "slow"), Rule.threshold(500), progress=False)
    names = [e.name for e in read_manifest(shards).shards]
    for name in names:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name
    rejected = [pq.read_table(tmp_path / run / "rejected.parquet").to_pylist() for run in ("fast", "slow")]
    assert rejected[0] == rejected[1] and len(rejected[0]) == 9
    assert read_manifest(tmp_path / "fast").shards == read_manifest(tmp_path / "slow").shards
    assert read_manifest(tmp_path / "fast").samples == 23 - 9  # positions 0, 3, 6, 9 of 10, 10 and 0 of 3 dropped
