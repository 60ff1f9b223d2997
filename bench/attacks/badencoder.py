"""Backdooring a clean encoder by fine-tuning: BadEncoder, and a DRUPE-style distribution-preserving variant.

BadEncoder (Jia et al., S&P 2022) fine-tunes a copy f' of the clean encoder f on unlabeled shadow images:
  L = -cos(f'(x + t), f'(x_ref)) - cos(f'(x_ref), f(x_ref)) - cos(f'(x), f(x)),
so triggered inputs land on the embedding of a reference image of the target class while clean inputs keep
their embeddings. DRUPE (Tao et al., 2024) adds terms that keep the triggered embeddings distributed like clean
ones, which defeats embedding-density detectors; here: a mean/variance matching term between the batch of
triggered embeddings and the clean ones, and a penalty that keeps triggered embeddings apart from each other.
The trigger is any function on uint8 images (bench.attacks.triggers), applied before normalisation.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dede_core.detector.checkpoint import atomic_torch_save
from dede_core.io.progress import Progress

TriggerFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class BackdoorConfig:
    """A fine-tuning attack; its hash (with the clean encoder's and the trigger's names) names the cache entry."""

    trigger: str = "patch"  # name in bench.attacks.TRIGGERS
    target: int = 0  # target class whose images serve as references
    references: int = 10  # reference images of the target class
    shadow_images: int = 5000  # unlabeled shadow images (first N of the shadow set)
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-4  # Adam
    clean_weight: float = 1.0  # weight of -cos(f'(x), f(x)): keep clean embeddings in place
    drupe: bool = False  # add the distribution-preserving terms
    drupe_weight: float = 0.1  # weight of the distribution terms
    drupe_spread: float = 0.1  # share of the pairwise-similarity penalty inside them
    seed: int = 0

    def digest(self, clean_fingerprint: str) -> str:
        settings = dataclasses.asdict(self)
        if not self.drupe:  # DRUPE's own knobs do not change a plain BadEncoder: keep its cache entry
            settings = {k: v for k, v in settings.items() if not k.startswith("drupe_")}
        payload = json.dumps([settings, clean_fingerprint], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _moments_gap(a: Tensor, b: Tensor) -> Tensor:
    """Mismatch of per-dimension mean and std between two embedding batches (normalised embeddings)."""
    return (a.mean(0) - b.mean(0)).pow(2).sum() + (a.std(0) - b.std(0)).pow(2).sum()


def backdoor_encoder(clean: nn.Module, *, normalize: Callable[[Tensor], Tensor], shadow_u8: Tensor,
                     reference_u8: Tensor, trigger: TriggerFn, config: BackdoorConfig,
                     log: Callable[[str], None] | None = None) -> nn.Module:
    """Fine-tune a copy of `clean` (images in [0, 1] after `normalize`) into a backdoored encoder."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    torch.manual_seed(config.seed)
    frozen = copy.deepcopy(clean).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(clean)
    student.eval()  # BatchNorm statistics stay those of the clean encoder; the weights still learn
    for p in student.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=config.lr)

    def prep(u8: Tensor) -> Tensor:
        x = u8.float().div(255)
        return normalize(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)

    shadow = shadow_u8[: config.shadow_images]
    refs = prep(reference_u8)
    with torch.no_grad():
        # ReLU features are all positive, so raw cosines between any two images start near 0.96 and the attack
        # objective is nearly flat; cosines are taken around the clean shadow embeddings' mean instead.
        center = torch.cat([frozen(prep(shadow[i:i + 256])) for i in range(0, min(len(shadow), 1024), 256)]).mean(0)
        ref_clean = F.normalize(frozen(refs) - center, dim=1)
    generator = torch.Generator().manual_seed(config.seed)
    steps = max(1, len(shadow) // config.batch_size)
    progress = Progress(config.epochs * steps * config.batch_size, desc="backdoor", interval=30.0)
    for epoch in range(config.epochs):
        order = torch.randperm(len(shadow), generator=generator)
        total = 0.0
        for step in range(steps):
            batch = shadow[order[step * config.batch_size:(step + 1) * config.batch_size]]
            x, xt = prep(batch), prep(trigger(batch))
            with torch.no_grad():
                clean_emb = F.normalize(frozen(x) - center, dim=1)
            out = F.normalize(student(torch.cat([x, xt, refs])) - center, dim=1)
            s_clean, s_trig, s_ref = out[: len(x)], out[len(x): 2 * len(x)], out[2 * len(x):]
            # Each triggered image is pulled towards a reference chosen at random (as with several references).
            pick = torch.randint(len(refs), (len(x),), generator=generator)
            loss = (-(s_trig * s_ref[pick]).sum(1).mean()
                    - (s_ref * ref_clean).sum(1).mean()
                    - config.clean_weight * (s_clean * clean_emb).sum(1).mean())
            if config.drupe:
                spread = (s_trig @ s_trig.T).fill_diagonal_(0).sum() / (len(x) * (len(x) - 1))
                loss = loss + config.drupe_weight * (_moments_gap(s_trig, clean_emb) + config.drupe_spread * spread)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            progress.update(len(x), f"epoch {epoch + 1}/{config.epochs} loss {loss.item():.3f}")
        log(f"backdoor ({config.trigger}{', drupe' if config.drupe else ''}) epoch {epoch + 1}/{config.epochs} "
            f"loss {total / steps:.4f}")
    return student.eval()


def cached_backdoor(cache_dir: str | Path, clean_fingerprint: str, config: BackdoorConfig,
                    build: Callable[[], nn.Module]) -> Path:
    """Build once and cache the backdoored encoder's state_dict under a name from the config's hash."""
    path = Path(cache_dir) / f"backdoor-{config.trigger}{'-drupe' if config.drupe else ''}-" \
                             f"{config.digest(clean_fingerprint)}.pt"
    if not path.is_file():
        model = build()
        atomic_torch_save(model.state_dict(), path)
        (path.with_suffix(".json")).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return path
