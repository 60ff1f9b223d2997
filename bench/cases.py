"""The generalization suite's situations: backdoored victims, the cases that detect them, the suite's settings,
and the images a case uses (crops of scikit-image's photos, Fashion-MNIST at its native 28 px, auxiliary sets)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bench.attacks import apply_trigger
from bench.attacks.badencoder import BackdoorConfig
from bench.datasets import load_fashion_mnist
from dede_core.detector.encoders import load_encoder

PHOTO_CLASSES = ("coffee", "rocket", "chelsea", "retina", "hubble_deep_field", "immunohistochemistry", "brick",
                 "grass", "gravel", "camera", "moon", "coins")
TRAIN_WIDTH = 0.62  # crops for training (aux, shadow, probe) come from this left part of each photo


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    from skimage import data as photos

    return Image.fromarray(getattr(photos, name)()).convert("RGB")


def photo_crops(side: int, count: int, *, split: str, seed: int) -> tuple[Tensor, Tensor]:
    """`count` RGB crops (N, 3, side, side) of the PHOTO_CLASSES photos and their class; split 'train' takes the
    left TRAIN_WIDTH of each photo, 'test' the rest, so the two never share pixels."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images, labels = [], []
    for i in range(count):
        label = i % len(PHOTO_CLASSES)
        photo = _photo(PHOTO_CLASSES[label])
        w, h = photo.size
        lo, hi = (0, int(TRAIN_WIDTH * w)) if split == "train" else (int(TRAIN_WIDTH * w), w)
        crop = int(min(rng.uniform(0.2, 0.45) * min(w, h), hi - lo - 1, h - 1))
        left, top = int(rng.integers(lo, hi - crop)), int(rng.integers(0, h - crop))
        patch = photo.resize((side, side), Image.BILINEAR, box=(left, top, left + crop, top + crop))
        images.append(torch.from_numpy(np.asarray(patch, dtype=np.uint8).copy()).permute(2, 0, 1))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def fashion(split: str, start: int, count: int) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST at its native 28 x 28 grayscale, images [start, start + count) of the split."""
    images, labels = load_fashion_mnist(split)
    return (torch.from_numpy(images[start:start + count].copy())[:, None],
            torch.from_numpy(labels[start:start + count].astype(np.int64)))


@dataclass(frozen=True)
class Victim:
    """A packaged pretrained encoder at its own input size, backdoored on shadow images of `dataset`."""

    encoder: str
    dataset: str  # "photos" (crops at the encoder's size) or "fashion" (28 px, which the encoder upsamples)
    trigger: str
    trigger_args: dict
    backdoor: BackdoorConfig


def _tune(trigger: str, **changes: Any) -> BackdoorConfig:
    settings = dict(trigger=trigger, target=0, references=10, shadow_images=1000, epochs=5, batch_size=64, lr=3e-4)
    return BackdoorConfig(**{**settings, **changes})


VICTIMS = {
    "effnet64-sticker-photos": Victim("efficientnet-lite0?size=64", "photos", "sticker", {"fraction": 0.2},
                                      _tune("sticker")),
    # At 28 px a 0.2 sticker (6 px) planted in 5 epochs on 1,000 images reaches ASR 0.47: larger and longer.
    "effnet64-sticker-fashion": Victim("efficientnet-lite0?size=64", "fashion", "sticker", {"fraction": 0.25},
                                       _tune("sticker", shadow_images=2000, epochs=8)),
    # Held out from tuning the verdict: a trigger family the suite did not have (SIG stripes).
    "effnet64-sig-photos": Victim("efficientnet-lite0?size=64", "photos", "sig", {"delta": 20.0, "frequency": 6.0},
                                  _tune("sig")),
    "effnet96-blend-photos": Victim("efficientnet-lite0?size=96", "photos", "blend", {"alpha": 0.2},
                                    _tune("blend", shadow_images=800, epochs=4)),
}


@dataclass(frozen=True)
class Case:
    """One held-out situation: a victim, where the auxiliary images come from and how many carry the trigger."""

    victim: str
    aux: str = "in"  # "in": the victim's dataset; "ood": the other dataset, at the corpus' side
    aux_poison: float = 0.01
    ablation: bool = False  # also train the no-embedding ablation (the health check must fail it)


CASES = {
    "sticker64-photos": Case("effnet64-sticker-photos", ablation=True),
    "sticker64-photos-aux0.5%": Case("effnet64-sticker-photos", aux_poison=0.005),
    "sticker64-photos-aux5%": Case("effnet64-sticker-photos", aux_poison=0.05),
    "sticker64-photos-ood-aux": Case("effnet64-sticker-photos", aux="ood"),
    "sticker64-fashion": Case("effnet64-sticker-fashion"),
    "blend96-photos": Case("effnet96-blend-photos"),
    # Widened for the verdict (issue #20): a clean auxiliary set for each victim, and a held-out trigger family.
    "sticker64-photos-clean-aux": Case("effnet64-sticker-photos", aux_poison=0.0),
    "sig64-photos-clean-aux": Case("effnet64-sig-photos", aux_poison=0.0),
    "sig64-photos": Case("effnet64-sig-photos"),
    "sig64-photos-ood-aux": Case("effnet64-sig-photos", aux="ood"),
    "blend96-photos-clean-aux": Case("effnet96-blend-photos", aux_poison=0.0),
}


@dataclass(frozen=True)
class SuiteConfig:
    """One run of the suite; part of every case's result id, so any change recomputes the cases."""

    cases: tuple[str, ...] = tuple(CASES)
    aux_images: int = 3000
    eval_images: int = 720  # clean evaluation images before the target class is removed
    probe_images: int = 1200  # labelled clean images for the victim's kNN and linear-probe accuracy
    min_asr: float = 0.8
    seed: int = 0
    backdoor: dict = dataclasses.field(default_factory=dict)  # BackdoorConfig overrides for every victim (tiny)
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig overrides: empty (dede's defaults) but tiny


def tiny_suite() -> SuiteConfig:
    """Minutes on 2 cores: only checks the machinery (a one-epoch backdoor, a few hundred images)."""
    return SuiteConfig(cases=("sticker64-photos",), aux_images=240, eval_images=48, probe_images=96, min_asr=0.0,
                       backdoor={"shadow_images": 64, "epochs": 1}, train={"epochs": 2})


def input_side(victim: Victim) -> int:
    """The side of the victim's input images (its encoder's input size)."""
    return load_encoder(victim.encoder).input_size


def data(victim: Victim, split: str, count: int, seed: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """`count` images of the victim's dataset and their labels; `offset` and `seed` keep the uses apart."""
    if victim.dataset == "photos":
        return photo_crops(input_side(victim), count, split=split, seed=seed + offset)
    start = {"train": 30_000, "test": 0}[split] + offset  # the SimCLR victims (bench.victims) train on 0-30k
    return fashion(split, start, count)


def trigger(victim: Victim, images: Tensor, seed: int) -> Tensor:
    """The victim's trigger on uint8 images; a sticker lands where `seed` puts it."""
    args = dict(victim.trigger_args)
    if victim.trigger == "sticker":
        args["seed"] = seed
    return apply_trigger(victim.trigger, images, **args)


def aux_images(case: Case, suite: SuiteConfig) -> Tensor:
    """Auxiliary images: in-distribution (train split) or the other dataset, `aux_poison` of them triggered."""
    victim = VICTIMS[case.victim]
    if case.aux == "in":
        aux, _ = data(victim, "train", suite.aux_images, seed=31, offset=20_000)
    elif victim.dataset == "photos":  # Fashion-MNIST, brought to the corpus' side and to RGB
        gray, _ = fashion("train", 50_000, suite.aux_images)
        size = input_side(victim)
        aux = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(g[0].numpy()).resize(
            (size, size), Image.BILINEAR).convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1) for g in gray])
    else:
        aux, _ = photo_crops(64, suite.aux_images, split="train", seed=31)
    aux = aux.clone()
    count = int(round(case.aux_poison * len(aux)))
    chosen = torch.randperm(len(aux), generator=torch.Generator().manual_seed(suite.seed + 1))[:count]
    if count and case.aux == "in":  # OOD auxiliary data is nobody's poisoned copy of the corpus
        aux[chosen] = trigger(victim, aux[chosen], seed=41)
    return aux
