"""Recipes for the victims used by the demo and the detection benchmark, each cached by its config hash.

A real user brings their own (possibly backdoored) encoder; these recipes build one from real data shipped by
packages so that the pipeline can be shown and measured end to end: a clean SimCLR encoder trained on
Fashion-MNIST, then backdoored by a BadEncoder-style fine-tune.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from bench.attacks import apply_trigger
from bench.attacks.badencoder import BackdoorConfig, backdoor_encoder, cached_backdoor
from bench.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from dede_core.detector.encoders import cifar_resnet18, load_encoder
from bench.ssl import CIFAR_MEAN, CIFAR_STD, SimCLRConfig, embed_all, knn_accuracy, linear_probe, train_simclr


def fashion_mnist_32(split: str) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as uint8 (N, 1, 32, 32), zero-padded from 28x28, and int64 labels."""
    images, labels = load_fashion_mnist(split)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return torch.from_numpy(padded)[:, None], torch.from_numpy(labels.astype(np.int64))


def _normalize(x: Tensor) -> Tensor:
    return (x - CIFAR_MEAN) / CIFAR_STD


@dataclass(frozen=True)
class VictimRecipe:
    """A clean encoder (SimCLR trained here, or a packaged pretrained one) and the backdoor planted in it."""

    simclr: SimCLRConfig = SimCLRConfig(width=16, epochs=2, train_images=10_000)
    backdoor: BackdoorConfig = BackdoorConfig(trigger="patch", target=0, references=10, shadow_images=2000,
                                              epochs=4, batch_size=64, lr=1e-3)
    trigger_args: dict = field(default_factory=dict)  # keyword arguments of the trigger function
    # An encoder spec with packaged weights, e.g. "efficientnet-lite0?size=64", backdoored instead of the SimCLR
    # encoder (simclr is then unused). Its kind must take `weights=` for the fine-tuned copy.
    pretrained: str | None = None

    def spec(self, weights: Path) -> str:
        """The spec under which the pipeline loads this recipe's (backdoored) encoder saved at `weights`."""
        if self.pretrained is None:
            return victim_spec(weights, self.simclr.width)
        return f"{self.pretrained}{'&' if '?' in self.pretrained else '?'}weights={weights}"


def _load_backbone(path: Path, width: int) -> torch.nn.Module:
    model = cifar_resnet18(width=width)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _pretrained(spec: str) -> tuple[torch.nn.Module, Callable[[Tensor], Tensor], str]:
    """(model, its input preparation for [0, 1] RGB tensors, weight fingerprint) of a packaged encoder."""
    encoder = load_encoder(spec)
    return encoder.model, encoder.prepare, encoder.fingerprint


def build_victim(recipe: VictimRecipe, cache_dir: str | Path,
                 log: Callable[[str], None] | None = None) -> tuple[Path | None, Path]:
    """(clean encoder weights, backdoored encoder weights), built once and then read from the cache.

    The clean weights are None for a pretrained recipe: they come from their package.
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    cache = Path(cache_dir)
    train_x, train_y = fashion_mnist_32("train")
    if recipe.pretrained is None:
        clean_path = train_simclr(train_x, recipe.simclr, cache, log=log)
        clean, normalize = _load_backbone(clean_path, recipe.simclr.width), _normalize
        from dede_core.detector.hashing import tensor_digest

        fingerprint = tensor_digest(clean.state_dict())
    else:
        clean_path = None
        clean, normalize, fingerprint = _pretrained(recipe.pretrained)
    cfg = recipe.backdoor
    # Shadow images come from the half of the training set SimCLR did not use; references from the target class.
    pool_x, pool_y = train_x[30_000:], train_y[30_000:]
    refs = pool_x[pool_y == cfg.target][: cfg.references]

    def trigger(images: Tensor) -> Tensor:
        return apply_trigger(cfg.trigger, images, **recipe.trigger_args)

    def build() -> torch.nn.Module:
        log(f"backdooring the clean encoder ({cfg.trigger} trigger, target {FASHION_MNIST_CLASSES[cfg.target]})")
        return backdoor_encoder(clean, normalize=normalize, shadow_u8=pool_x[5000:], reference_u8=refs,
                                trigger=trigger, config=cfg, log=log)

    bad_path = cached_backdoor(cache, fingerprint + json.dumps(recipe.trigger_args, sort_keys=True), cfg, build)
    return clean_path, bad_path


@torch.no_grad()
def evaluate_victim(spec: str, *, trigger: str, target: int, trigger_args: dict | None = None,
                    train_images: int = 10_000, test_images: int = 2000) -> dict[str, float]:
    """kNN accuracy, linear-probe clean accuracy and attack success rate on Fashion-MNIST test."""
    encode = load_encoder(spec)

    train_x, train_y = fashion_mnist_32("train")
    test_x, test_y = fashion_mnist_32("test")
    train_x, train_y = train_x[:train_images], train_y[:train_images]
    test_x, test_y = test_x[:test_images], test_y[:test_images]
    train_emb, test_emb = embed_all(encode, train_x), embed_all(encode, test_x)
    with torch.enable_grad():
        probe = linear_probe(train_emb, train_y)
    others = test_y != target
    triggered = embed_all(encode, apply_trigger(trigger, test_x[others], **(trigger_args or {})))
    return {
        "knn_accuracy": knn_accuracy(train_emb, train_y, test_emb, test_y),
        "clean_accuracy": (probe(test_emb).argmax(1) == test_y).float().mean().item(),
        "attack_success_rate": (probe(triggered).argmax(1) == target).float().mean().item(),
    }


def victim_spec(weights: Path, width: int) -> str:
    """The encoder spec under which the pipeline loads a recipe's encoder."""
    return f"cifar-resnet18?weights={weights}&width={width}"


def write_poisoned_corpus(out_dir: str | Path, images: Tensor, labels: Tensor, *, rate: float, trigger: str,
                          target: int, seed: int = 0, trigger_args: dict | None = None) -> list[str]:
    """Write images as PNGs in class folders, `rate` of them (never of the target class) carrying the trigger.

    Returns the keys of the planted samples (as the pipeline names them: '<class>/<prefix>_<index>'), which
    are written to OUT.planted.json beside the folder so that a run can be scored against them.
    """
    from bench.datasets import write_image_folder

    if not 0 <= rate < 1:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.nonzero(labels != target).flatten()
    count = int(round(rate * len(images)))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values
    poisoned = images.clone()
    if count:
        poisoned[chosen] = apply_trigger(trigger, images[chosen], **(trigger_args or {}))[:, : images.shape[1]]
    names = [name.replace("/", "_") for name in FASHION_MNIST_CLASSES]
    write_image_folder(poisoned[:, 0].numpy(), labels.numpy(), str(out_dir), class_names=names, prefix="img")
    planted = [f"{names[int(labels[i])]}/img_{int(i):06d}" for i in chosen.tolist()]
    Path(f"{out_dir}.planted.json").write_text(json.dumps(planted, indent=0))
    return planted
