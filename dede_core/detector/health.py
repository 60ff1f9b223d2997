"""A label-free health check of a trained detector: does it use the victim's embedding at all?

DeDe finds a triggered image because the victim's embedding of it points elsewhere and the decoder follows the
embedding. A decoder that learned to ignore the embedding (too little training, an encoder whose embedding
carries little of the image) reconstructs an image equally well from any embedding and cannot find a backdoor.
The check needs no labels: on the held-out auxiliary images, reconstruct each image from its own embedding and
from another image's embedding (no visible patch), and compare the errors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dede_core.detector.masking import mask_noise
from dede_core.detector.model import DeDe

# Below this embedding-reliance ratio a detector is reported as unable to find backdoors, and clean refuses it
# unless told otherwise. The no-embedding ablation sits at 1.00 by construction; a detector that failed on a held-out
# attack (an encoder and trigger nobody tuned for) measured 1.13, and the detectors of docs/results/generalization.md and the demo's measured
# 2.87-5.84 (the tables carry each value).
RELIANCE_FLOOR = 1.3
CHUNK = 64  # rows per forward pass


def _errors(model: DeDe, images: Tensor, embeddings: Tensor, keys: list[str], visible: int,
            device: torch.device) -> Tensor:
    """Per-image summed squared error (N,) of reconstructions from `embeddings`, masks from the keys."""
    out = []
    length = model.config.num_patches
    for start in range(0, len(images), CHUNK):
        n = len(images[start:start + CHUNK])
        x01 = torch.zeros((CHUNK, *images.shape[1:]))
        x01[:n] = images[start:start + CHUNK].float().div(255)
        emb = torch.zeros((CHUNK, embeddings.shape[1]))
        emb[:n] = embeddings[start:start + CHUNK].float()
        noise = torch.zeros(CHUNK, length)
        noise[:n] = mask_noise(keys[start:start + n], length, seed=0)
        x = model.normalize(x01.to(device))
        latent, mask, ids_restore = model.forward_encoder(x, emb.to(device), noise.to(device), visible)
        out.append(model.pixel_errors(x, model.forward_decoder(latent, ids_restore), mask)[:n].cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def held_out_error(model: DeDe, calibration: dict[str, Any], device: torch.device) -> float:
    """Mean reconstruction error of the held-out images at the scoring visibility (what training watches)."""
    was_training = model.training
    model.eval()
    try:
        errors = _errors(model, calibration["images"], calibration["embeddings"], calibration["keys"],
                         model.config.score_visible, device)
    finally:
        model.train(was_training)
    return float(errors.double().mean()) if len(errors) else float("nan")


@torch.no_grad()
def health_check(model: DeDe, calibration: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Embedding reliance on the held-out images: mean error with another image's embedding divided by the mean
    error with the image's own (0 visible patches), and how often the own embedding reconstructs better."""
    images, embeddings, keys = calibration["images"], calibration["embeddings"], calibration["keys"]
    if len(images) < 2:
        return {"embedding_reliance": None, "own_better": None, "floor": RELIANCE_FLOOR, "passed": None,
                "images": len(images)}
    was_training = model.training
    model.eval()
    try:
        own = _errors(model, images, embeddings, keys, 0, device).double()
        other = _errors(model, images, embeddings.roll(1, dims=0), keys, 0, device).double()
    finally:
        model.train(was_training)
    reliance = float(other.mean() / own.mean().clamp_min(1e-12))
    return {"embedding_reliance": round(reliance, 4), "own_better": round(float((own < other).double().mean()), 4),
            "floor": RELIANCE_FLOOR, "passed": reliance >= RELIANCE_FLOOR, "images": len(images),
            "own_error": float(own.mean())}


def health_passed(health: dict[str, Any] | None) -> bool | None:
    """True/False from a stored check; None when the detector predates the check or had too few images."""
    return None if not health else health.get("passed")


def describe_health(health: dict[str, Any] | None) -> str:
    """One line (or a loud paragraph) for users: what the check found and what it means."""
    if not health or health.get("embedding_reliance") is None:
        return "detector health: not measured (a detector trained before the check, or under 2 held-out images)"
    line = (f"embedding reliance {health['embedding_reliance']:.2f} (floor {health['floor']:.2f}; own embedding "
            f"reconstructs better for {health['own_better']:.0%} of {health['images']} held-out images)")
    if health["passed"]:
        return f"detector health: ok, {line}"
    return ("WARNING: THIS DETECTOR CANNOT FIND BACKDOORS. Its reconstructions barely depend on the victim's "
            f"embedding: {line}. Train longer, on more or more varied auxiliary images, or check the encoder. "
            "dede clean and dede sanitize refuse to clean with it unless --allow-weak-detector is given.")
