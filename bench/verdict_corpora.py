"""The realistic corpora of the verdict suite, written as image folders a user would hand to `dede sanitize`:
clean test images plus a few percent of triggered ones (triggered copies of other test images, never of a corpus
image), and a clean corpus in which near-duplicate groups of 2-50 copies make up 5%."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bench.cases import VICTIMS, Case, data, trigger

POISON_MARK = "poison"  # in a triggered file's name, so its key tells it apart
RATES = (0.0, 0.001, 0.01, 0.05)
CLEAN_IMAGES = 1000  # clean test images per corpus (before the target class is removed)
NEAR_DUP_SHARE = 0.05


def _save(image: Tensor, path: Path, *, jpeg_quality: int | None = None) -> None:
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    if jpeg_quality is None:
        picture.save(path, format="PNG")
    else:
        picture.save(path, format="JPEG", quality=jpeg_quality)


def _clean(case: Case, count: int) -> tuple[Tensor, Tensor]:
    victim = VICTIMS[case.victim]
    images, labels = data(victim, "test", count, seed=51)
    keep = labels != victim.backdoor.target
    return images[keep], labels[keep]


def write_poisoned(case: Case, rate: float, folder: Path, clean_images: int = CLEAN_IMAGES) -> int:
    """FOLDER/<label>/c00012.png for clean images and <label>/poison00003.png for triggered ones; returns how
    many are triggered (at least one at a rate above 0)."""
    victim = VICTIMS[case.victim]
    clean, labels = _clean(case, clean_images)
    count = 0 if rate == 0 else max(1, round(rate * len(clean) / (1 - rate)))
    for i, (image, label) in enumerate(zip(clean, labels.tolist())):
        os.makedirs(folder / str(label), exist_ok=True)
        _save(image, folder / str(label) / f"c{i:05d}.png")
    if count:
        others, other_labels = data(victim, "test", 4 * count + 40, seed=53, offset=7000)
        others = others[other_labels != victim.backdoor.target][:count]
        for i, image in enumerate(trigger(victim, others, seed=54)):
            os.makedirs(folder / "x", exist_ok=True)
            _save(image, folder / "x" / f"{POISON_MARK}{i:05d}.png")
    return count


def _copy(image: Tensor, rng: np.random.Generator) -> bytes:
    """One re-upload of a picture: resized by 0.75-1.25 and back, saved as JPEG at quality 60-95."""
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    side = picture.size[0]
    scaled = max(8, int(round(side * rng.uniform(0.75, 1.25))))
    picture = picture.resize((scaled, scaled), Image.BILINEAR).resize((side, side), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
    return buffer.getvalue()


def write_near_duplicates(case: Case, folder: Path, clean_images: int = CLEAN_IMAGES, seed: int = 0) -> list[int]:
    """A clean corpus whose last NEAR_DUP_SHARE are groups of 2-50 re-uploads of some of its pictures; returns
    the group sizes (every sample is clean: whatever is dropped is lost)."""
    rng = np.random.default_rng(seed)
    clean, labels = _clean(case, clean_images)
    budget = int(round(NEAR_DUP_SHARE * len(clean)))
    sizes = []
    while sum(sizes) < budget:
        sizes.append(int(min(rng.integers(2, 51), budget - sum(sizes))) if budget - sum(sizes) >= 2 else 2)
    kept = len(clean) - sum(sizes) + len(sizes)  # each group's first member is the original picture
    for i in range(kept):
        os.makedirs(folder / str(int(labels[i])), exist_ok=True)
        _save(clean[i], folder / str(int(labels[i])) / f"c{i:05d}.png")
    for g, size in enumerate(sizes):
        original = kept - len(sizes) + g
        for j in range(1, size):
            path = folder / str(int(labels[original])) / f"c{original:05d}-copy{j:02d}.jpg"
            path.write_bytes(_copy(clean[original], rng))
    return sizes
