"""A clean self-supervised victim: SimCLR on Fashion-MNIST with a CIFAR-stem ResNet-18, sized for 2 CPU cores.

Resumable: one checkpoint per epoch in a folder named by the config's hash; a finished run is a cache hit.
Augmentations run batched on tensors (per-sample random affine crops and flips through one grid_sample, and
brightness / contrast jitter), because per-image PIL transforms would cost more than the network on 2 cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dede_core.detector.checkpoint import atomic_torch_save, load_payload
from dede_core.detector.encoders import cifar_resnet18
from dede_core.io.progress import Progress


@dataclass(frozen=True)
class SimCLRConfig:
    """Everything that determines the trained encoder (its hash names the cache folder)."""

    width: int = 16  # ResNet-18 base width; the embedding is 8 * width wide
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3  # Adam
    weight_decay: float = 1e-6
    temperature: float = 0.5  # NT-Xent
    proj_dim: int = 128
    min_scale: float = 0.35  # smallest crop area fraction
    jitter: float = 0.4  # brightness and contrast jitter strength
    train_images: int = 60_000  # first N Fashion-MNIST training images
    seed: int = 0

    def digest(self) -> str:
        """Names the run folder; epochs is left out so that raising it continues the same run."""
        settings = dataclasses.asdict(self)
        settings.pop("epochs")
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def augment(x: Tensor, *, min_scale: float, jitter: float, generator: torch.Generator) -> Tensor:
    """Random resized crop + horizontal flip + brightness/contrast jitter, per sample; x (N, C, H, W) in [0, 1]."""
    n = x.shape[0]
    scale = torch.empty(n).uniform_(min_scale, 1.0, generator=generator).sqrt()  # side fraction
    aspect = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)).sqrt()
    sx, sy = (scale * aspect).clamp(max=1), (scale / aspect).clamp(max=1)
    tx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=generator) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brightness = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * jitter
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * jitter
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean * brightness).clamp(0, 1)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's contrastive loss over 2N views; z (N, P)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, targets)


class SimCLR(nn.Module):
    def __init__(self, *, width: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone = cifar_resnet18(width=width)
        dim = 8 * width
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def to_input(images_u8: Tensor) -> Tensor:
    """uint8 (N, 1|3, 32, 32) -> float (N, 3, 32, 32) in [0, 1]."""
    x = images_u8.float().div_(255)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def train_simclr(images_u8: Tensor, config: SimCLRConfig, cache_dir: str | Path,
                 log: Callable[[str], None] | None = None) -> Path:
    """Train (or resume, or reuse) a SimCLR encoder; returns the path of the backbone's state_dict."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    run = Path(cache_dir) / f"simclr-{config.digest()}"
    final, state_path = run / f"encoder-e{config.epochs}.pt", run / "state.pt"
    if final.is_file():
        return final
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    torch.manual_seed(config.seed)
    model = SimCLR(width=config.width, proj_dim=config.proj_dim)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = 0
    if state_path.is_file():
        state = load_payload(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        if start > config.epochs:
            raise ValueError(f"{run} already holds {start} epochs, more than the {config.epochs} asked for")
        log(f"resuming SimCLR {run.name} after epoch {start}")
    data = images_u8[: config.train_images]
    n = len(data)
    steps = n // config.batch_size
    progress = Progress((config.epochs - start) * steps * config.batch_size, desc="simclr", interval=30.0)
    model.train()
    for epoch in range(start, config.epochs):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator)
        total = 0.0
        t0 = time.perf_counter()
        for step in range(steps):
            x = to_input(data[order[step * config.batch_size:(step + 1) * config.batch_size]])
            v1 = augment(x, min_scale=config.min_scale, jitter=config.jitter, generator=generator)
            v2 = augment(x, min_scale=config.min_scale, jitter=config.jitter, generator=generator)
            z = model(torch.cat([(v1 - CIFAR_MEAN) / CIFAR_STD, (v2 - CIFAR_MEAN) / CIFAR_STD]))
            loss = nt_xent(z[: len(x)], z[len(x):], config.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            progress.update(len(x), f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.3f}")
        atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1},
                          state_path)
        log(f"simclr epoch {epoch + 1}/{config.epochs} loss {total / steps:.4f} "
            f"({time.perf_counter() - t0:.0f}s)")
    atomic_torch_save(model.backbone.state_dict(), final)
    return final


@torch.no_grad()
def embed_all(encoder: Callable[[Tensor], Tensor], images_u8: Tensor, batch: int = 512) -> Tensor:
    """Embeddings (N, D) of uint8 images through an encoder taking floats in [0, 1]."""
    return torch.cat([encoder(to_input(images_u8[i:i + batch])) for i in range(0, len(images_u8), batch)])


@torch.no_grad()
def knn_accuracy(train_emb: Tensor, train_labels: Tensor, test_emb: Tensor, test_labels: Tensor,
                 k: int = 200, temperature: float = 0.1, classes: int = 10) -> float:
    """Weighted cosine k-NN accuracy (the usual SimCLR monitor: k=200, weights exp(sim / 0.1))."""
    bank, queries = F.normalize(train_emb, dim=1), F.normalize(test_emb, dim=1)
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(queries), 1024):
        sim, idx = (queries[i:i + 1024] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), classes).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[i:i + 1024]).sum().item()
    return correct / len(queries)


def linear_probe(train_emb: Tensor, train_labels: Tensor, classes: int = 10, epochs: int = 100,
                 seed: int = 0) -> nn.Module:
    """A logistic-regression head on frozen, standardised embeddings (full-batch Adam)."""
    torch.manual_seed(seed)
    mean, std = train_emb.mean(0), train_emb.std(0) + 1e-6
    head = nn.Linear(train_emb.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-5)
    x = (train_emb - mean) / std
    for _ in range(epochs):
        loss = F.cross_entropy(head(x), train_labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe = nn.Sequential(_Standardise(mean, std), head).eval()
    return probe


class _Standardise(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
