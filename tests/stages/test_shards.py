import io
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from dede_core.io import digests
from dede_core.stages.shard import list_shards, sniff_extension, write_shards
from dede_core.io.sources import open_source
from schemas.manifest import read_manifest
from conftest import on_dede_log


def encoded(value: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(buf, fmt)
    return buf.getvalue()


def read_back(out) -> list[dict]:
    urls = [str(out / e.name) for e in list_shards(str(out))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("shards")
    return out, write_shards(str(image_folder), str(out), samples_per_shard=20, progress=False)


def test_image_folder_round_trip(sharded, image_folder):
    out, manifest = sharded
    source = open_source(str(image_folder))
    assert [e.samples for e in manifest.shards] == [20, 20, 8] and manifest.samples == 48
    assert [e.name for e in manifest.shards] == ["000000.tar", "000001.tar", "000002.tar"]
    assert manifest.classes == ["a", "b"] and manifest.skipped == [] and manifest.format == "dede-shards/1"
    samples = read_back(out)
    assert [s["__key__"] for s in samples] == source.keys()
    for sample in samples:
        meta = json.loads(sample["json"])
        assert sample["png"] == (image_folder / meta["path"]).read_bytes()
        assert int(sample["cls"]) == manifest.classes.index(meta["class"]) == (0 if meta["class"] == "a" else 1)
    for entry in manifest.shards:
        data = (out / entry.name).read_bytes()
        assert entry.bytes == len(data) and entry.digest == digests.of(entry.hash, data)
    assert manifest.shards[0].first_key == source.keys()[0] and manifest.shards[-1].last_key == source.keys()[-1]
    assert read_manifest(str(out)) == manifest


def test_rerun_is_a_noop_and_other_settings_are_refused(sharded, image_folder):
    out, manifest = sharded
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lines = []
    with on_dede_log(lines.append):
        assert write_shards(str(image_folder), str(out), samples_per_shard=20) == manifest
    assert "already sharded" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(ValueError, match="samples_per_shard: 20 -> 16"):
        write_shards(str(image_folder), str(out), samples_per_shard=16)


def test_same_input_gives_identical_shards_and_a_lost_shard_is_rewritten(tmp_path, sharded, image_folder):
    _, manifest = sharded
    again = write_shards(str(image_folder), str(tmp_path), samples_per_shard=20, progress=False)
    assert again.shards == manifest.shards  # same keys, same bytes, same sha256
    (tmp_path / "000001.tar").unlink()
    (tmp_path / "000007.tar").write_bytes(b"stale")  # left by an older, longer run
    (tmp_path / "000007.spans.json").write_bytes(b"stale")
    (tmp_path / ".000002.tar.x1.tmp").write_bytes(b"crashed")
    assert write_shards(str(image_folder), str(tmp_path), samples_per_shard=20, progress=False).shards == again.shards
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000000.spans.json", "000000.tar", "000001.spans.json", "000001.tar", "000002.spans.json", "000002.tar",
        "manifest.json", "source-000001.parquet"]


def test_parquet_source_hf_style(tmp_path):
    images = [encoded(10, "PNG"), encoded(20, "JPEG"), None, encoded(30, "PNG")]
    structs = [None if b is None else {"bytes": b, "path": f"x{i}.img"} for i, b in enumerate(images)]
    table = pa.table({"image": structs, "label": ["dog", "cat", "cat", "dog"]})
    pq.write_table(table, tmp_path / "train.parquet")
    manifest = write_shards(str(tmp_path / "train.parquet"), str(tmp_path / "out"), samples_per_shard=2,
                            progress=False)
    assert manifest.classes == ["cat", "dog"] and manifest.samples == 3
    assert manifest.skipped == [("train_00000002", "row 2: no image bytes")]
    samples = read_back(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["train_00000000", "train_00000001", "train_00000003"]
    assert samples[0]["png"] == images[0] and samples[1]["jpg"] == images[1] and samples[2]["png"] == images[3]
    assert [int(s["cls"]) for s in samples] == [1, 0, 1]
    assert json.loads(samples[1]["json"]) == {"row": 1, "path": "x1.img", "class": "cat", "source": "train.parquet#row=1"}


def test_parquet_key_column_and_duplicates(tmp_path):
    data = [encoded(i, "PNG") for i in range(3)]
    pq.write_table(pa.table({"png": data, "id": ["a.1", "b", "c"]}), tmp_path / "ok.parquet")
    write_shards(str(tmp_path / "ok.parquet"), str(tmp_path / "out"), key_column="id", progress=False)
    assert [s["__key__"] for s in read_back(tmp_path / "out")] == ["a_1", "b", "c"]
    with fsspec.open("memory://remote/ok.parquet", "wb") as f:  # any fsspec URL works for Parquet
        pq.write_table(pa.table({"png": data, "id": ["a.1", "b", "c"]}), f)
    remote = write_shards("memory://remote/ok.parquet", str(tmp_path / "remote"), progress=False)
    assert remote.source == "memory://remote/ok.parquet" and remote.shards[0].first_key == "ok_00000000"
    pq.write_table(pa.table({"png": data, "id": ["a", "b", "a"]}), tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="duplicate sample key.*'a'"):
        write_shards(str(tmp_path / "dup.parquet"), str(tmp_path / "dup"), key_column="id")
    with pytest.raises(ValueError, match="no image column"):
        pq.write_table(pa.table({"pixels": data}), tmp_path / "none.parquet")
        write_shards(str(tmp_path / "none.parquet"), str(tmp_path / "none"))


def test_bad_manifest_and_sniffing(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        list_shards(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(ValueError, match="not a valid dede-shards/1 manifest"):
        read_manifest(str(tmp_path))
    assert [sniff_extension(encoded(1, f)) for f in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")] == [
        "png", "jpg", "webp", "bmp", "gif", "tiff"]
    assert sniff_extension(b"garbage") is None
