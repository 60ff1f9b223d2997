"""Per-sample backdoor scores: reconstruction error of the DeDe decoder given the victim's embedding.

A sample's score is a pure function of (detector, encoder, image, key, seed, draws): masks come from the key
(dede_core.detector.masking), and every forward pass runs on a fixed number of rows (`chunk`, zero-padded), because
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

from dede_core.detector.checkpoint import Checkpoint, load_detector
from dede_core.detector.encoders import FrozenEncoder
from dede_core.detector.masking import mask_noise
from dede_core.detector.model import DeDe


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
    # fp32 on CUDA instead of its bf16 autocast. Opt-out: slower, scores closer to (not equal to) the CPU's.
    cuda_fp32: bool = False
    # Reference embeddings (spread over the detector's k-NN bank) whose embedding-only reconstructions normalise
    # the score: score = own error / the `reference_quantile` quantile of the errors under the references, on the
    # same hidden pixels. A raw error is dominated by how hard an image is to draw; the ratio asks whether the
    # image's own embedding explains it as well as the best-fitting other images' do, which a triggered image's
    # (the target's) does not. A low quantile rather than the mean: an image unlike the auxiliary data is drawn
    # badly from every embedding, its own included, and must not look triggered. 0 references: the raw error.
    references: int = 64
    reference_quantile: float = 0.1

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.visible is not None and self.visible < 0:
            raise ValueError(f"visible must be >= 0, got {self.visible}")
        if self.references < 0:
            raise ValueError(f"references must be >= 0, got {self.references}")
        if not 0 <= self.reference_quantile <= 1:
            raise ValueError(f"reference_quantile must be in [0, 1], got {self.reference_quantile}")

    def to_dict(self) -> dict[str, Any]:
        """The fields; cpu_bf16 and cuda_fp32 only when on, so a folder's identity names an option only where it is
        used (and folders scored before an option existed keep their identity)."""
        fields = dataclasses.asdict(self)
        for option in ("cpu_bf16", "cuda_fp32"):
            if not fields[option]:
                del fields[option]
        return fields


@dataclass(frozen=True)
class ScoreOutput:
    score: Tensor  # (N,) float32: the error divided by the reference quantile (the error itself with references=0)
    error: Tensor  # (N,) float32: mean over draws of the sum of squared error over hidden pixels (DeDe's score)
    embedding: Tensor  # (N, D) float32: the victim's raw embedding


def autocast_for(device: torch.device, *, cpu_bf16: bool = False, cuda_fp32: bool = False
                 ) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless fp32 is asked for; on the CPU only when asked (it changes results, and is slower
    without bf16 units)."""
    if (device.type == "cuda" and not cuda_fp32) or (cpu_bf16 and device.type == "cpu"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def spread_rows(bank: Tensor, count: int) -> Tensor:
    """`count` rows evenly spaced through `bank` (a bank in source order may be sorted by class)."""
    if count <= 0 or len(bank) == 0:
        return bank[:0]
    index = torch.linspace(0, len(bank) - 1, min(count, len(bank))).round().long()
    return bank[index]


class Scorer:
    """Scores batches of decoded images with one detector and its victim encoder.

    The victim embeds each image at its own input size (`victim` view); the detector reconstructs the image at
    its own size (`images`). Both views come from one decode of the original bytes (dede_core.io.images).
    """

    def __init__(self, *, detector: DeDe, encoder: FrozenEncoder, config: ScoreConfig,
                 device: str | torch.device = "cpu", references: Tensor | None = None) -> None:
        visible = detector.config.score_visible if config.visible is None else config.visible
        if visible >= detector.config.num_patches:
            raise ValueError(f"visible ({visible}) must be below the number of patches "
                             f"({detector.config.num_patches})")
        if encoder.dim != detector.global_dim:
            raise ValueError(f"encoder embeds to {encoder.dim} dims but the detector expects {detector.global_dim}")
        if config.references and (references is None or len(references) == 0):
            raise ValueError("this score setting normalises by reference embeddings, but none were given (a "
                             "detector checkpoint carries them in its k-NN bank); use references=0 for raw errors")
        self.device = torch.device(device)
        self.detector = detector.to(self.device).eval()
        self.encoder = encoder.to(self.device)
        self.config = config
        self.visible = visible
        self.reference_errors: ReferenceErrors | None = None
        if config.references:
            preds = self._reconstruct(spread_rows(references.float(), config.references))
            self.reference_errors = ReferenceErrors(preds)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device, cpu_bf16=self.config.cpu_bf16, cuda_fp32=self.config.cuda_fp32)

    @torch.no_grad()
    def _reconstruct(self, embeddings: Tensor) -> Tensor:
        """Embedding-only reconstructions (R, L, p*p*C) of R embeddings, in fixed chunks."""
        cfg, rows = self.detector.config, self.config.chunk
        preds = []
        for start in range(0, len(embeddings), rows):
            part = embeddings[start:start + rows]
            padded = torch.zeros((rows, part.shape[1]))
            padded[:len(part)] = part
            blank = torch.zeros((rows, cfg.in_chans, cfg.img_size, cfg.img_size), device=self.device)
            noise = torch.zeros(rows, cfg.num_patches, device=self.device)
            with self._autocast():
                latent, _, ids_restore = self.detector.forward_encoder(blank, padded.to(self.device), noise, 0)
                preds.append(self.detector.forward_decoder(latent, ids_restore).float()[:len(part)])
        return torch.cat(preds)

    @torch.no_grad()
    def embed(self, victim: Tensor) -> Tensor:
        """uint8 images (N, C, S, S) at the encoder's input size -> (N, D) float32, in fixed-size chunks."""
        out = [self._embed_chunk(victim[start:start + self.config.chunk])
               for start in range(0, len(victim), self.config.chunk)]
        return torch.cat(out) if out else torch.empty(0, self.encoder.dim)

    def _embed_chunk(self, victim: Tensor) -> Tensor:
        padded = torch.zeros((self.config.chunk, *victim.shape[1:]), dtype=torch.uint8)
        padded[:len(victim)] = victim
        x01 = padded.to(self.device, non_blocking=True).float().div_(255)
        with self._autocast():
            return self.encoder(x01).float()[:len(victim)].cpu()

    @torch.no_grad()
    def score(self, images: Tensor, keys: list[str], *, victim: Tensor | None = None,
              embedding: Tensor | None = None) -> ScoreOutput:
        """uint8 images (N, C, S, S) at the detector's size, one key each, and either the encoder's view of the
        same images (`victim`) or their embeddings -> ScoreOutput. Without either, `images` are the encoder's
        view too, which is allowed only when the encoder's input size is the detector's."""
        cfg = self.detector.config
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected uint8 images (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {images.dtype} {tuple(images.shape)}")
        if len(keys) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(keys)} keys")
        if embedding is None:
            if victim is None:
                if self.encoder.input_size != cfg.img_size:
                    raise ValueError(f"the encoder takes {self.encoder.input_size}-px images and the detector "
                                     f"{cfg.img_size}-px ones: pass the encoder's own view (victim=...)")
                victim = images
            if len(victim) != len(keys):
                raise ValueError(f"{len(victim)} encoder views but {len(keys)} keys")
            embedding = self.embed(victim)
        elif len(embedding) != len(keys):
            raise ValueError(f"{len(embedding)} embeddings but {len(keys)} keys")
        scores, errors = [], []
        for start in range(0, len(keys), self.config.chunk):
            stop = start + self.config.chunk
            score, error = self._score_chunk(images[start:stop], embedding[start:stop], keys[start:stop])
            scores.append(score)
            errors.append(error)
        if not scores:
            return ScoreOutput(torch.empty(0), torch.empty(0), torch.empty(0, self.encoder.dim))
        return ScoreOutput(torch.cat(scores), torch.cat(errors), embedding.float())

    def _score_chunk(self, images: Tensor, embedding: Tensor, keys: list[str]) -> tuple[Tensor, Tensor]:
        n, rows = len(keys), self.config.chunk
        padded = torch.zeros((rows, *images.shape[1:]), dtype=torch.uint8)
        padded[:n] = images
        emb = torch.zeros((rows, embedding.shape[1]))
        emb[:n] = embedding
        x = self.detector.normalize(padded.to(self.device, non_blocking=True).float().div_(255))
        emb = emb.to(self.device)
        # With no visible patch every draw hides everything: one pass gives the mean of K identical draws.
        draws = 1 if self.visible == 0 else self.config.draws
        total = torch.zeros(rows, device=self.device)
        count = 0 if self.reference_errors is None else self.reference_errors.count
        reference = torch.zeros(rows, count, device=self.device)
        length = self.detector.config.num_patches
        for draw in range(draws):
            noise = torch.zeros(rows, length)
            noise[:n] = mask_noise(keys, length, seed=self.config.seed, draw=draw)
            with self._autocast():
                latent, mask, ids_restore = self.detector.forward_encoder(
                    x, emb, noise.to(self.device), self.visible)
                pred = self.detector.forward_decoder(latent, ids_restore)
            total += self.detector.pixel_errors(x, pred, mask)
            if self.reference_errors is not None:
                reference += self.reference_errors.errors(self.detector.patchify(x), mask)
        error = total / draws
        if self.reference_errors is None:
            return error[:n].cpu(), error[:n].cpu()
        typical = torch.quantile(reference / draws, self.config.reference_quantile, dim=1)
        return (error / typical.clamp_min(1e-12))[:n].cpu(), error[:n].cpu()


class ReferenceErrors:
    """The squared error of each reference reconstruction against each row's image, summed over the row's hidden
    patches, as pixel_errors sums it for the row's own reconstruction, for all references at once.

    sum over hidden patches l of |ref_l - t_l|^2 = sum_l h_l |ref_l|^2 + sum_l h_l |t_l|^2 - 2 sum_l h_l ref_l . t_l:
    the last term is one batched matrix product over the patches, where a loop over the references passes over a
    (rows, patches, pixels) difference once per reference: at 224 px with 64 references, 91 ms against 1.8 s for a
    chunk of 64 rows on 2 cores (timed ad hoc on random tensors of those shapes). In float64, so that the
    expansion's cancellation stays below float32's rounding: it matches the loop within 2e-7 relative (issue #15
    notes in docs/results/throughput.md)."""

    def __init__(self, preds: Tensor) -> None:  # (R, L, P) reconstructions from the reference embeddings
        self.count = len(preds)
        preds = preds.double()
        self.squares = preds.pow(2).sum(dim=-1)  # (R, L)
        self.by_patch = preds.permute(1, 2, 0).contiguous()  # (L, P, R)

    def errors(self, target: Tensor, mask: Tensor) -> Tensor:
        """target (rows, L, P) patchified images, mask (rows, L) 1 where hidden -> (rows, R) float32."""
        target, hidden = target.double(), mask.double()
        cross = (torch.bmm(target.transpose(0, 1), self.by_patch) * hidden.T[..., None]).sum(dim=0)  # (rows, R)
        own = (target.pow(2).sum(dim=-1) * hidden).sum(dim=1, keepdim=True)  # (rows, 1)
        return (hidden @ self.squares.T + own - 2 * cross).float()


def load_scorer(path: str, config: ScoreConfig = ScoreConfig(), *, device: str | torch.device = "cpu",
                encoder_spec: str | None = None) -> tuple[Scorer, Checkpoint]:
    """A Scorer for a detector checkpoint (its reference embeddings from the checkpoint's k-NN bank)."""
    model, encoder, ckpt = load_detector(path, encoder_spec=encoder_spec)
    config = for_checkpoint(config, ckpt)
    return Scorer(detector=model, encoder=encoder, config=config, device=device, references=ckpt.knn_bank), ckpt


def for_checkpoint(config: ScoreConfig, ckpt: Checkpoint) -> ScoreConfig:
    """`config`, without reference normalisation when the detector carries no k-NN bank to take references from
    (its score is then the raw reconstruction error, and the recorded settings say so)."""
    if ckpt.knn_bank is None or len(ckpt.knn_bank) == 0:
        return dataclasses.replace(config, references=0)
    return config
