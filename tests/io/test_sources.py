import io
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dede_core.io.sources import ImageFolderSource, Source, TarShardSource, open_source


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_image_folder_round_trip(tmp_path):
    files = {"cat/a.png": png(1), "cat/sub/b.JPG": png(2), "dog/c.webp": png(3), "loose.bmp": png(4)}
    for rel, data in files.items():
        write(tmp_path / rel, data)
    write(tmp_path / "dog/notes.txt", b"not an image")

    src = open_source(str(tmp_path))
    assert isinstance(src, ImageFolderSource) and isinstance(src, Source)
    assert src.classes == ["cat", "dog"]
    assert src.keys() == ["cat/a", "cat/sub/b", "dog/c", "loose"]
    assert len(src) == 4 and src.skipped == []
    by_key = {s.key: s for s in (src[i] for i in range(len(src)))}
    assert [by_key[k].label for k in src.keys()] == [0, 0, 1, None]
    for rel, data in files.items():
        sample = by_key[os.path.splitext(rel)[0]]
        assert sample.data == data and sample.meta == {"path": rel}
    assert src[-1].key == "loose"
    with pytest.raises(IndexError):
        src[4]


def test_image_folder_is_deterministic_and_lazy(tmp_path):
    for name in ["b.png", "a.png", "c.png"]:
        write(tmp_path / name, png(5))
    src = open_source(str(tmp_path))
    assert src.keys() == open_source(str(tmp_path)).keys() == ["a", "b", "c"]
    assert src.classes is None
    write(tmp_path / "a.png", png(6))  # bytes are read on access, not at open
    assert src[0].data == png(6)


def test_dotted_names_give_dot_free_keys(tmp_path):
    write(tmp_path / "v1.2/img.001.png", png(1))
    src = open_source(str(tmp_path))
    assert src.keys() == ["v1_2/img_001"]
    assert src.classes == ["v1.2"]


@pytest.mark.parametrize("names", [["a/b.png", "a/b.jpg"], ["a/b.c.png", "a/b_c.png"]])
def test_key_collision_raises_with_paths(tmp_path, names):
    for name in names:
        write(tmp_path / name, png(1))
    with pytest.raises(ValueError, match="collision") as info:
        open_source(str(tmp_path))
    for name in names:
        assert name in str(info.value)


def write_shards(directory, n_shards: int = 2, per_shard: int = 3) -> dict:
    """Shards written the way our pipeline writes them; returns key -> (bytes, label, meta)."""
    os.makedirs(directory, exist_ok=True)
    expected = {}
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(directory, f"{s:06d}.tar")) as sink:
            for j in range(per_shard):
                key = f"shard{s}/{j:04d}"
                data, label, meta = png(s * 10 + j), s + j, {"src": f"x{j}.png", "j": j}
                sink.write({"__key__": key, "png": data, "cls": label, "json": meta})
                expected[key] = (data, label, meta)
    return expected


def check_tar_source(src, expected) -> None:
    assert isinstance(src, TarShardSource) and isinstance(src, Source)
    assert src.keys() == list(expected) and src.classes is None and src.skipped == []
    for i, key in enumerate(src.keys()):
        sample = src[i]
        assert sample.key == key
        assert (sample.data, sample.label, sample.meta) == expected[key]


def test_tar_single_file(tmp_path):
    expected = write_shards(tmp_path, n_shards=1)
    check_tar_source(open_source(str(tmp_path / "000000.tar")), expected)


def test_tar_directory_and_brace_pattern(tmp_path):
    expected = write_shards(tmp_path / "shards", n_shards=3)
    check_tar_source(open_source(str(tmp_path / "shards")), expected)
    src = open_source(str(tmp_path / "shards" / "{000000..000002}.tar"))
    check_tar_source(src, expected)
    assert src[4].data == expected["shard1/0001"][0]  # random access across shards
    assert len(open_source(str(tmp_path / "shards" / "{000001..000002}.tar"))) == 6


def test_tar_skips_and_records_bad_samples(tmp_path):
    path = str(tmp_path / "mixed.tar")
    with wds.TarWriter(path) as sink:
        sink.write({"__key__": "good", "jpg": b"JPEGBYTES", "png": png(1), "txt": "caption"})
        sink.write({"__key__": "noimage", "txt": "caption only", "cls": 3})
        sink.write({"__key__": "badcls", "png": png(2), "cls": b"cat"})
        sink.write({"__key__": "good", "png": png(3)})
        sink.write({"__key__": "dir.v2/x", "png": png(4)})
    src = open_source(path)
    assert src.keys() == ["good", "dir_v2/x"]
    assert src[0].data == png(1)  # png wins over jpg
    assert src[0].label is None and src[0].meta == {}
    reasons = dict(src.skipped)
    assert set(reasons) == {"noimage", "badcls", "good"}
    assert "no image member" in reasons["noimage"]
    assert ".cls" in reasons["badcls"]
    assert "duplicate key" in reasons["good"]


def test_tar_keys_follow_first_dot_of_basename(tmp_path):
    path = str(tmp_path / "raw.tar")
    with tarfile.open(path, "w") as tar:
        for name, data in [("./a/img.seg.png", b"seg"), ("./a/img.png", png(7)), ("README", b"hi")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = open_source(path)
    assert src.keys() == ["a/img"] and src[0].data == png(7)
    assert [k for k, _ in src.skipped] == ["README"]


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="000001"):
        write_shards(tmp_path / "s", n_shards=1)
        open_source(str(tmp_path / "s" / "{000000..000001}.tar"))
    write(tmp_path / "data.zip", b"PK")
    with pytest.raises(ValueError, match="image folder"):
        open_source(str(tmp_path / "data.zip"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no images"):
        open_source(str(tmp_path / "empty"))
    write(tmp_path / "fake.tar", b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="not a readable"):
        open_source(str(tmp_path / "fake.tar"))


def test_links_outside_the_root_and_image_named_folders_are_skipped_not_read(tmp_path):
    from dede_core.io.sources import ImageFolderSource

    outside = tmp_path / "private.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\nprivate")
    root = tmp_path / "corpus"
    (root / "a" / "sub").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nx")
    (root / "a" / "inside.png").symlink_to(root / "a" / "x.png")  # inside the root: read
    (root / "a" / "link.png").symlink_to(outside)
    (root / "a" / "out_dir").symlink_to(tmp_path)
    (root / "a" / "loop").symlink_to(root / "a")
    (root / "a" / "broken.png").symlink_to(tmp_path / "missing.png")
    (root / "a" / "dir.png").mkdir()
    source = ImageFolderSource(str(root))
    assert source.keys() == ["a/inside", "a/x"]
    reasons = dict(source.skipped)
    assert "outside the source root" in reasons["a/link"] and "--follow-external-links" in reasons["a/link"]
    assert "outside the source root" in reasons["a/out_dir"] and "link loop" in reasons["a/loop"]
    assert "broken link" in reasons["a/broken"] and "directory named like an image" in reasons["a/dir"]
    trusted = ImageFolderSource(str(root), follow_external_links=True)
    assert "a/link" in trusted.keys() and trusted[trusted.keys().index("a/link")].data.endswith(b"private")
