"""Per-sample backdoor scores: reconstruction error of the DeDe decoder given the victim's embedding.

A sample's score is a pure function of (detector, encoder, image, key, seed, draws): masks come from the key
(dede_core.masking), and every forward pass runs on a fixed number of rows (`chunk`, zero-padded), because
matrix kernels on both CPU and GPU may round differently for different batch shapes. So a score is bitwise the
same whatever batch it arrives in, its position, the batch size and the order.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dede_core.encoders import FrozenEncoder
from dede_core.masking import mask_noise
from dede_core.model import DeDe


@dataclass(frozen=True)
class ScoreConfig:
    """How scores are computed; saved beside every scores file."""

    seed: int = 0  # mask seed: with the sample key and the draw index it fixes every mask
    draws: int = 1  # K mask draws per sample; the score is the mean of the K reference scores
    visible: int | None = None  # visible patches while scoring; None takes the detector's score_visible
    chunk: int = 64  # rows per forward pass; part of the result's identity (see module docstring)
    # bf16 autocast on the CPU as well (CUDA always uses it). Opt-in: other (close) scores than fp32, still bitwise
    # the same whatever the batch; faster only on CPUs with bf16 units (AMX, AVX512-BF16), see throughput.md.
    cpu_bf16: bool = False

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.visible is not None and self.visible < 0:
            raise ValueError(f"visible must be >= 0, got {self.visible}")

    def to_dict(self) -> dict[str, Any]:
        """The fields, without cpu_bf16 when it is off: folders scored before the option existed still resume."""
        fields = dataclasses.asdict(self)
        if not self.cpu_bf16:
            del fields["cpu_bf16"]
        return fields


@dataclass(frozen=True)
class ScoreOutput:
    score: Tensor  # (N,) float32: mean over draws of the sum of squared error over hidden pixels
    embedding: Tensor  # (N, D) float32: the victim's raw embedding


def autocast_for(device: torch.device, *, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; on the CPU only when asked (it changes results, and is slower without bf16 units)."""
    if device.type == "cuda" or (cpu_bf16 and device.type == "cpu"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Scorer:
    """Scores batches of decoded images with one detector and its victim encoder."""

    def __init__(self, *, detector: DeDe, encoder: FrozenEncoder, config: ScoreConfig,
                 device: str | torch.device = "cpu") -> None:
        visible = detector.config.score_visible if config.visible is None else config.visible
        if visible >= detector.config.num_patches:
            raise ValueError(f"visible ({visible}) must be below the number of patches "
                             f"({detector.config.num_patches})")
        if encoder.dim != detector.global_dim:
            raise ValueError(f"encoder embeds to {encoder.dim} dims but the detector expects {detector.global_dim}")
        self.device = torch.device(device)
        self.detector = detector.to(self.device).eval()
        self.encoder = encoder.to(self.device)
        self.config = config
        self.visible = visible

    @torch.no_grad()
    def score(self, images: Tensor, keys: list[str]) -> ScoreOutput:
        """uint8 images (N, C, S, S) at the detector's size, one key each -> ScoreOutput."""
        cfg = self.detector.config
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected uint8 images (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {images.dtype} {tuple(images.shape)}")
        if len(keys) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(keys)} keys")
        scores, embeddings = [], []
        for start in range(0, len(keys), self.config.chunk):
            chunk_keys = keys[start:start + self.config.chunk]
            score, embedding = self._score_chunk(images[start:start + self.config.chunk], chunk_keys)
            scores.append(score)
            embeddings.append(embedding)
        if not scores:
            return ScoreOutput(torch.empty(0), torch.empty(0, self.encoder.dim))
        return ScoreOutput(torch.cat(scores), torch.cat(embeddings))

    def _score_chunk(self, images: Tensor, keys: list[str]) -> tuple[Tensor, Tensor]:
        n, rows = len(keys), self.config.chunk
        padded = torch.zeros((rows, *images.shape[1:]), dtype=torch.uint8)
        padded[:n] = images
        x01 = padded.to(self.device, non_blocking=True).float().div_(255)
        with autocast_for(self.device, cpu_bf16=self.config.cpu_bf16):
            embedding = self.encoder(x01).float()
        x = self.detector.normalize(x01)
        # With no visible patch every draw hides everything: one pass gives the mean of K identical draws.
        draws = 1 if self.visible == 0 else self.config.draws
        total = torch.zeros(rows, device=self.device)
        length = self.detector.config.num_patches
        for draw in range(draws):
            noise = torch.zeros(rows, length)
            noise[:n] = mask_noise(keys, length, seed=self.config.seed, draw=draw)
            with autocast_for(self.device, cpu_bf16=self.config.cpu_bf16):
                latent, mask, ids_restore = self.detector.forward_encoder(
                    x, embedding, noise.to(self.device), self.visible)
                pred = self.detector.forward_decoder(latent, ids_restore)
            total += self.detector.pixel_errors(x, pred, mask)
        return (total / draws)[:n].cpu(), embedding[:n].cpu()
