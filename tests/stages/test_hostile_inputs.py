"""Hostile and broken inputs through the whole pipeline (`dede shard` -> `dede score` -> `dede clean`).

Every sample ends as a row with a status and an error in the scores table, or is refused with a message, and
the run goes on; a broken shard is recorded while the others finish; a cleaned corpus holds only scored
samples unless --keep-unscored; nothing is written outside the output folders. The decoder worker survives any
bytes (property test).
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import smooth_images
from dede_core.detector.config import cpu
from dede_core.io.loader import DecodedSamples, make_loader
from dede_core.io.sources import Sample, open_source
from dede_core.detector.train import TrainConfig, train_detector
from flows.cli import main
from schemas.manifest import read_manifest
from test_select import write_shards as write_hand_made_shards

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
SCORE = ["--workers", "0", "--batch-size", "8", "--chunk", "8", "--knn-k", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def detector(tmp_path_factory, image_folder, encoder) -> str:
    out = tmp_path_factory.mktemp("detector")
    return str(train_detector(source=open_source(str(image_folder)), data_id="tiny", encoder=encoder,
                              config=cpu(**TINY), train=TrainConfig(epochs=1, batch_size=16, holdout=6, knn_bank=20),
                              out_dir=out))


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(seed: int = 0) -> Image.Image:
    return Image.fromarray(smooth_images(1, seed=seed)[0].permute(1, 2, 0).numpy())


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims width x height (CRC fixed): a decompression bomb's header."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def garbled(data: bytes, start: int, n: int = 40) -> bytes:
    return data[:start] + bytes((b ^ 0x5A) for b in data[start:start + n]) + data[start + n:]


PNG, JPEG = encode(photo(1)), encode(photo(2), "JPEG", quality=90)
PALETTE = Image.new("RGB", (20, 12), (10, 200, 30)).convert("P")
# file name -> (bytes, expected status, a word the error must hold)
BROKEN = {
    "trunc_png.png": (PNG[: len(PNG) // 2], "truncat"),
    "trunc_jpg.jpg": (JPEG[: len(JPEG) // 2], "truncat"),
    "corrupt_png.png": (garbled(PNG, PNG.index(b"IDAT") + 8), "corrupt"),
    "corrupt_jpg.jpg": (garbled(JPEG, len(JPEG) // 2, 200), "corrupt"),
    "empty.png": (b"", "empty"),
    "notes.png": (b"shopping list: eggs, milk\n", "not a supported image"),
    "paper.jpg": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "not a supported image"),
    "bomb_header.png": (png_claiming(30000, 30000), "decompression bomb"),
    "bomb_pixels.png": (encode(Image.new("1", (9000, 9000))), "decompression bomb"),  # 81 Mpx > 64 Mpx
}
ODD = {  # decodable in every mode a corpus may hold
    "cmyk.jpg": encode(Image.new("CMYK", (20, 12), (0, 255, 255, 0)), "JPEG"),
    "cmyk_tiff.tif": encode(Image.new("CMYK", (20, 12), (0, 255, 255, 0)), "TIFF"),
    "sixteen_bit.png": encode(Image.fromarray(np.full((12, 20), 40000, np.uint16))),
    "palette.png": encode(PALETTE),
    "palette_alpha.png": encode(PALETTE, transparency=0),
    "rgba.png": encode(Image.new("RGBA", (20, 12), (10, 20, 30, 100))),
    "gray_alpha.png": encode(Image.new("LA", (20, 12), (90, 128))),
    "gray.png": encode(Image.new("L", (20, 12), 77)),
    "gray_jpeg.jpg": encode(Image.new("L", (20, 12), 77), "JPEG"),
    "bilevel.png": encode(Image.new("1", (20, 12), 1)),
    "anim.gif": encode(PALETTE, save_all=True, append_images=[PALETTE.copy()]),
    "photo_webp.webp": encode(photo(3), "WEBP"),
    "photo_bmp.bmp": encode(photo(4), "BMP"),
}


def write(path: Path | bytes, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def tree(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under folder (names that are not UTF-8 included)."""
    root = os.fsencode(folder)
    return {os.fsdecode(os.path.relpath(os.path.join(d, f), root)): Path(os.fsdecode(os.path.join(d, f))).read_bytes()
            for d, _, files in os.walk(root) for f in files}


def scores(folder: Path) -> dict[str, dict]:
    rows = pq.read_table(sorted(folder.glob("[0-9]*.parquet"))).to_pylist()
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "a key has two rows"
    return by_key


def cleaned(folder: Path) -> dict[str, bytes]:
    """key -> image bytes of every sample in a cleaned folder (read as dede reads shards)."""
    source = open_source(str(folder))
    return {source.keys()[i]: source[i].data for i in range(len(source))}


def rejected(folder: Path) -> dict[str, str]:
    table = pq.read_table(folder / "rejected.parquet")
    reasons = dict(zip(table.column("key").to_pylist(), table.column("reason").to_pylist()))
    assert len(reasons) == table.num_rows, "a key is rejected twice"
    return reasons


def run_pipeline(src: Path, root: Path, detector: str, *clean_options: str, score_rc: int = 0) -> None:
    assert main(["shard", str(src), "--out", str(root / "shards"), "--samples-per-shard", "8"]) == 0
    assert main(["score", str(root / "shards"), "--detector", detector, "--out", str(root / "scores"), *SCORE]) \
        == score_rc
    if score_rc == 0:
        assert main(["clean", "--allow-weak-detector", str(root / "shards"), "--scores", str(root / "scores"), "--out", str(root / "clean"),
                     "--quantile", "0.9", "--no-report", *clean_options]) == 0


def test_broken_and_odd_images_end_as_rows_and_only_scored_ones_are_kept(tmp_path, detector):
    corpus = tmp_path / "corpus"
    files = {f"good_{i}.png": encode(photo(10 + i)) for i in range(8)}
    files |= {name: data for name, (data, _) in BROKEN.items()} | ODD
    files |= {"v1.2/img.001.png": PNG, "v1.2/other.jpeg": JPEG}  # a dotted folder (a class) and name
    for name, data in files.items():
        write(corpus / name, data)
    write(os.fsencode(corpus) + b"/caf\xe9.png", PNG)  # a name that is not UTF-8 (latin-1)
    before = tree(corpus)
    run_pipeline(corpus, tmp_path, detector)

    rows = scores(tmp_path / "scores")
    keys = {os.path.splitext(n)[0].replace(".", "_") for n in files} | {"caf%E9"}
    assert set(rows) == keys and len(rows) == len(files) + 1  # one row per file, nothing lost or merged
    for name, (_, word) in BROKEN.items():
        row = rows[os.path.splitext(name)[0]]
        assert row["status"] == "decode_error" and word in row["error"].lower(), (name, row["error"])
        assert row["score"] is None and row["knn_score"] is None and row["width"] is None
    ok = {k for k, r in rows.items() if r["status"] == "ok"}
    assert ok == keys - {os.path.splitext(n)[0] for n in BROKEN}
    assert all(rows[k]["score"] > 0 and rows[k]["error"] is None for k in ok)
    assert (rows["cmyk"]["width"], rows["cmyk"]["height"]) == (20, 12)

    kept, reasons = cleaned(tmp_path / "clean"), rejected(tmp_path / "clean")
    assert set(kept) | set(reasons) == keys and not set(kept) & set(reasons)
    assert set(kept) <= ok  # never a sample that was not scored
    for name in BROKEN:
        key = os.path.splitext(name)[0]
        assert reasons[key] == f"decode_error: {rows[key]['error']}"
    by_key = {os.path.splitext(n)[0].replace(".", "_"): d for n, d in files.items()} | {"caf%E9": PNG}
    assert all(kept[k] == by_key[k] for k in kept)  # byte for byte

    assert main(["clean", "--allow-weak-detector", str(tmp_path / "shards"), "--scores", str(tmp_path / "scores"), "--out",
                 str(tmp_path / "kept_all"), "--quantile", "0.9", "--no-report", "--keep-unscored"]) == 0
    kept_all = cleaned(tmp_path / "kept_all")
    assert {os.path.splitext(n)[0] for n in BROKEN} <= set(kept_all)  # asked for: kept, byte for byte
    assert all(kept_all[k] == by_key[k] for k in kept_all)
    assert tree(corpus) == before
    assert sorted(os.listdir(tmp_path)) == ["clean", "corpus", "kept_all", "scores", "shards"]


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_hostile_tar_member_names_never_write_outside_the_output(tmp_path, detector):
    outside = tmp_path / "outside"  # where an absolute member name points
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "000000.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        add(tar, "ok/0001.png", PNG)
        add(tar, "ok/0001.cls", b"3")
        add(tar, f"{outside}/abs.png", PNG)
        add(tar, "../../evil.png", PNG)
        add(tar, "./deep/../../../up.png", JPEG)
        add(tar, "bad\udce9name.png", PNG)  # the byte 0xe9: not UTF-8
        add(tar, "many.dots.in.name.png", PNG)  # webdataset: key 'many', extension 'dots.in.name.png'
        add(tar, "link.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add(tar, "hard.png", kind=tarfile.LNKTYPE, link="ok/0001.png")
        add(tar, "fifo.png", kind=tarfile.FIFOTYPE)
        add(tar, "somedir", kind=tarfile.DIRTYPE)
        add(tar, "README", b"hello")
    run_pipeline(src, tmp_path, detector)

    skipped = dict(read_manifest(tmp_path / "shards").skipped)  # recorded, with the reason
    assert {"link_png", "hard_png", "fifo_png", "README", "many"} <= set(skipped)
    assert "not a regular file" in skipped["link_png"] and "no image member" in skipped["many"]
    rows = scores(tmp_path / "scores")
    assert set(rows) == {"ok/0001", f"{outside}/abs".replace(".", "_"), "__/__/evil", "deep/__/__/__/up",
                         "bad%E9name"}
    assert {r["status"] for r in rows.values()} == {"ok"} and rows["ok/0001"]["label"] == 3
    assert set(cleaned(tmp_path / "clean")) | set(rejected(tmp_path / "clean")) == set(rows)

    assert not outside.exists() and not (tmp_path.parent / "evil.png").exists()
    assert sorted(os.listdir(tmp_path)) == ["clean", "scores", "shards", "src"]
    for folder in ("shards", "scores", "clean"):  # only dede's own files, nothing extracted
        assert all(name.endswith((".tar", ".parquet", ".json")) for name in tree(tmp_path / folder))
    target = tmp_path / "extracted"  # and the cleaned tars stay inside any folder they are extracted into
    for shard in read_manifest(tmp_path / "clean").shards:
        with tarfile.open(tmp_path / "clean" / shard.name) as tar:
            tar.extractall(target, filter="data")
    assert all(p.resolve().is_relative_to(target) for p in target.rglob("*"))


def test_a_truncated_source_tar_is_refused_with_its_name(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        with tarfile.open(src / f"part{i}.tar", "w") as tar:
            for j in range(3):
                add(tar, f"s{i}_{j}.png", encode(photo(j)))
    data = (src / "part1.tar").read_bytes()
    (src / "part1.tar").write_bytes(data[: len(data) // 2])
    out = tmp_path / "shards"
    assert main(["shard", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "part1.tar" in err and ("truncated" in err or "not a readable" in err), err
    assert not out.exists() or not os.listdir(out)  # no half-made shards folder


def test_a_broken_shard_is_recorded_and_the_others_finish(tmp_path, image_folder, detector, capsys):
    shards, out = tmp_path / "shards", tmp_path / "scores"
    assert main(["shard", str(image_folder), "--out", str(shards), "--samples-per-shard", "20"]) == 0
    good = (shards / "000001.tar").read_bytes()
    (shards / "000001.tar").write_bytes(good[:100] + b"\xff" * 8 + good[108:])  # first header: bad checksum
    argv = ["score", str(shards), "--detector", detector, "--out", str(out), *SCORE]
    assert main(argv) == 1
    assert "000001.tar" in capsys.readouterr().err
    assert "not a readable" in json.loads((out / "_failed" / "000001.json").read_text())["error"]
    assert sorted(p.name for p in out.glob("[0-9]*.parquet")) == ["000000.parquet", "000002.parquet"]
    clean = ["clean", "--allow-weak-detector", str(shards), "--scores", str(out), "--out", str(tmp_path / "clean"), "--no-report"]
    assert main(clean) == 2  # never a cleaned corpus that silently lacks a shard
    err = capsys.readouterr().err
    assert "000001.tar" in err and "could not read" in err and not (tmp_path / "clean").exists()
    (shards / "000001.tar").write_bytes(good)  # restored: the rerun scores only that shard
    assert main(argv) == 0 and not (out / "_failed" / "000001.json").exists()
    assert main(clean) == 0 and len(cleaned(tmp_path / "clean")) + len(rejected(tmp_path / "clean")) == 48


def test_duplicate_keys_are_refused_at_sharding(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        with tarfile.open(src / f"{i}.tar", "w") as tar:
            add(tar, f"only_{i}.png", PNG)
            add(tar, "twice.png", PNG)
    assert main(["shard", str(src), "--out", str(tmp_path / "a")]) == 2
    with tarfile.open(src / "1.tar", "w") as tar:
        add(tar, "inside.png", PNG)
        add(tar, "other.png", PNG)
        add(tar, "inside.png", JPEG)
    assert main(["shard", str(src / "1.tar"), "--out", str(tmp_path / "b")]) == 2
    folder = tmp_path / "folder"
    write(folder / "x.png", PNG)
    write(folder / "x.jpg", JPEG)
    assert main(["shard", str(folder), "--out", str(tmp_path / "c")]) == 2
    assert not any((tmp_path / n / "manifest.json").exists() for n in "abc")


def test_duplicate_keys_in_hand_made_shards_are_never_cleaned_silently(tmp_path, detector, capsys):
    """Shards not made by `dede shard`: a repeated key is a read_error row, and clean refuses the ambiguity."""
    shards, out = tmp_path / "shards", tmp_path / "scores"
    write_hand_made_shards(str(shards), [[{"__key__": "a", "png": PNG}, {"__key__": "b", "png": PNG},
                                          {"__key__": "a", "jpg": JPEG}], [{"__key__": "c", "png": PNG}]])
    assert main(["score", str(shards), "--detector", detector, "--out", str(out), *SCORE]) == 0
    rows = pq.read_table(out / "000000.parquet").to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [("a", "ok"), ("b", "ok"), ("a", "read_error")]
    assert "duplicate key" in rows[2]["error"]
    capsys.readouterr()
    assert main(["clean", "--allow-weak-detector", str(shards), "--scores", str(out), "--out", str(tmp_path / "clean"), "--no-report"]) == 2
    assert "duplicate keys" in capsys.readouterr().err and not (tmp_path / "clean").exists()


def test_parquet_source_with_missing_null_or_wrong_image_column(tmp_path, detector, capsys):
    images = [PNG, None, b"", JPEG, b"garbage bytes"]
    pq.write_table(pa.table({"image": images, "label": [0, 1, 0, 1, 0]}), tmp_path / "rows.parquet")
    run_pipeline(tmp_path / "rows.parquet", tmp_path / "run", detector)
    assert read_manifest(tmp_path / "run" / "shards").skipped == [
        ("rows_00000001", "row 1: no image bytes"), ("rows_00000002", "row 2: no image bytes")]
    rows = scores(tmp_path / "run" / "scores")
    assert {k: r["status"] for k, r in rows.items()} == {  # bytes of no image format are stored as .bin
        "rows_00000000": "ok", "rows_00000003": "ok", "rows_00000004": "read_error"}
    assert "rows_00000004" in rejected(tmp_path / "run" / "clean")

    capsys.readouterr()
    for name, table, message in [
        ("none.parquet", pa.table({"pixels": [PNG]}), "no image column"),
        ("nulls.parquet", pa.table({"image": pa.array([None, None], pa.binary())}), "no readable samples"),
        ("text.parquet", pa.table({"image": ["a.png", "b.png"]}), "expected encoded image bytes"),
    ]:
        pq.write_table(table, tmp_path / name)
        assert main(["shard", str(tmp_path / name), "--out", str(tmp_path / f"{name}_out")]) == 2
        assert message in capsys.readouterr().err


class BytesSource:
    """A Source over in-memory byte strings; None stands for a sample that cannot be read at all."""

    classes, skipped = None, []

    def __init__(self, blobs: list[bytes | None]) -> None:
        self.blobs = blobs

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> Sample:
        if self.blobs[i] is None:
            raise OSError(f"sample {i}: the disk said no")
        return Sample(key=f"k{i}", data=self.blobs[i], label=None, meta={})

    def keys(self) -> list[str]:
        return [f"k{i}" for i in range(len(self.blobs))]


CONFIG = cpu(img_size=16, patch_size=4)
SEEDS = [PNG, JPEG, *ODD.values(), encode(photo(5), "GIF"), encode(photo(6), "TIFF")]


def check_items(blobs: list[bytes | None], items: list[dict]) -> None:
    """One item per sample, in order, each ok or with an error message (exactly one of the two)."""
    assert [item["index"] for item in items] == list(range(len(blobs)))
    for item, blob in zip(items, blobs):
        assert item["ok"] != bool(item["error"]), item["error"]
        assert item["views"][0].shape == (3, 16, 16) and item["views"][0].dtype == torch.uint8
        if blob is None:
            assert not item["ok"] and "disk said no" in item["error"]


mutated = st.builds(
    lambda seed, cut, edits: bytes(garble(seed[:cut], edits)),
    st.sampled_from(SEEDS), st.integers(0, 4000),
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6))


def garble(data: bytes, edits: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data)
    for pos, value in edits:
        if pos < len(out):
            out[pos] = value
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the tags of mangled TIFFs, then copes
@settings(max_examples=120, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=200), mutated, st.none()), min_size=1, max_size=5))
def test_decoder_worker_gives_every_sample_a_status_whatever_the_bytes(blobs):
    samples = DecodedSamples(BytesSource(blobs), views=(CONFIG.view,))  # what each DataLoader worker runs
    check_items(blobs, [samples[i] for i in range(len(samples))])


def test_decoder_worker_processes_survive_hostile_bytes():
    blobs = [data for data, _ in BROKEN.values()] + list(ODD.values()) + [None, os.urandom(300)]
    batches = list(make_loader(BytesSource(blobs), views=(CONFIG.view,), batch_size=4, workers=2))
    items = [{"index": i, "ok": ok, "error": e, "views": [img]} for b in batches
             for i, ok, e, img in zip(b["index"].tolist(), b["ok"].tolist(), b["error"], b["views"][0])]
    check_items(blobs, items)
    assert sum(item["ok"] for item in items) == len(ODD)
