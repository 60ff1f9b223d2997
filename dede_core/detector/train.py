"""Fitting the DeDe decoder on auxiliary images, with per-epoch checkpoints and resume.

The victim is frozen and there is no augmentation, so every image's embedding is the same in every epoch:
it is computed once, in fixed-size chunks, and cached with the decoded images in the run folder.
Epoch order and mask noise come from generators seeded by (seed, epoch), so a resumed run takes the same
steps as one that was never interrupted.
"""

from __future__ import annotations

import logging
import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dede_core.detector.aux import AuxData, aux_data, split_holdout
from dede_core.detector.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dede_core.detector.config import DetectorConfig
from dede_core.detector.encoders import FrozenEncoder
from dede_core.detector.health import describe_health, health_check, held_out_error
from dede_core.detector.model import DeDe
from dede_core.io.loader import decode_workers
from dede_core.io.progress import Progress, format_seconds
from dede_core.detector.scorer import autocast_for
from dede_core.io.sources import Source
from schemas.manifest import differences
from schemas.names import CHECKPOINT

log = logging.getLogger("dede")



@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (reference: Adam lr 1e-3, wd 1e-6, batch 256, 200 epochs)."""

    # Total epochs; None trains until the embedding reliance on the held-out images (dede_core.detector.health: what DeDe
    # detects with) has not improved by min_improvement for `patience` epochs, or max_epochs, and keeps the best
    # epoch's weights. The held-out error at the scoring visibility is recorded too, but it is no stopping rule: it
    # rises while the decoder learns to use the visible patches and falls again later (measured).
    # Raising `epochs` on a rerun continues a finished run.
    epochs: int | None = None
    max_epochs: int = 100
    patience: int = 8
    # No early stop before this many optimiser steps: the decoder first learns the visible patches and the mean
    # image, and only then starts to use the embedding (the reliance sits at 1.00 for the first steps).
    min_steps: int = 600
    min_improvement: float = 0.005  # relative: a new best must exceed (1 + this) x the best so far
    # Images per optimiser step. The reference's 256 suits 50k images; an auxiliary set of a few thousand then
    # gives ~10 steps an epoch, and the embedding pathway needs hundreds of steps to form.
    batch_size: int = 64
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-6  # Adam weight decay
    seed: int = 0  # weight init, epoch order and training masks
    max_images: int | None = None  # use only the first N samples of the source (in its stable order)
    embed_chunk: int = 64  # rows per encoder pass while caching embeddings
    holdout: int = 500  # aux samples kept out of training, stored in the checkpoint for label-free thresholds
    knn_bank: int = 5000  # training embeddings stored in the checkpoint for the k-NN score

    def __post_init__(self) -> None:
        for name in ("batch_size", "embed_chunk", "max_epochs", "patience", "min_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (or None: until the held-out embedding reliance stops improving), "
                             f"got {self.epochs}")
        if not 0 <= self.min_improvement < 1:
            raise ValueError(f"min_improvement must be in [0, 1), got {self.min_improvement}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if self.holdout < 0 or self.knn_bank < 0:
            raise ValueError(f"holdout and knn_bank must be >= 0, got {self.holdout}, {self.knn_bank}")


def _seeded(seed: int, *parts: int) -> torch.Generator:
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def run_identity(*, config: DetectorConfig, train: TrainConfig, encoder: FrozenEncoder,
                 data_id: str) -> dict[str, Any]:
    """What must match for a rerun to resume a run; epochs is left out so a run can be extended."""
    settings = dataclasses.asdict(train)
    for name in ("epochs", "max_epochs", "patience", "min_improvement", "min_steps"):  # when to stop: may extend
        settings.pop(name)
    return {"config": config.to_dict(), "train": settings, "encoder_spec": encoder.spec,
            "encoder_fingerprint": encoder.fingerprint, "data": data_id}


def best_epoch(reliance: list[float], train: TrainConfig) -> int:
    """1-based epoch whose embedding reliance last beat the best so far by min_improvement (0 for none)."""
    best, best_value = 0, float("-inf")
    for index, value in enumerate(reliance):
        if value > best_value * (1 + train.min_improvement) if best_value > 0 else value > best_value:
            best, best_value = index + 1, value
    return best


def stop_reason(reliance: list[float], epoch: int, train: TrainConfig, steps_per_epoch: int = 1) -> str | None:
    """Why training stops after `epoch` epochs with this held-out embedding-reliance history, or None to go on."""
    if train.epochs is not None:
        return f"{train.epochs} epochs as asked" if epoch >= train.epochs else None
    if epoch >= train.max_epochs:
        return f"max_epochs {train.max_epochs}"
    best = best_epoch(reliance[:epoch], train)
    if reliance and epoch - best >= train.patience and epoch * steps_per_epoch >= train.min_steps:
        return (f"held-out embedding reliance stopped improving (best {reliance[best - 1]:.3f} at epoch {best}, "
                f"no {train.min_improvement:.1%} gain in {train.patience} epochs); weights of epoch {best} kept")
    return None


HISTORIES = ("loss_history", "held_out_history", "reliance_history")


def _resume(previous: Checkpoint | None, path: Path, model: DeDe, optimizer: torch.optim.Optimizer
            ) -> tuple[int, dict[str, list], dict[str, torch.Tensor] | None]:
    """Load a previous run's weights (and optimiser, if it was interrupted);
    -> (epochs done, histories, weights of the best epoch so far)."""
    if previous is None:
        return 0, {name: [] for name in HISTORIES}, None
    model.load_state_dict(previous.state_dict)
    best = None
    if previous.train_state is not None:
        optimizer.load_state_dict(previous.train_state["optimizer"])
        best = previous.train_state.get("best")
        log.info(f"resuming {path} after epoch {previous.meta['epoch']}")
    # A finished run being extended keeps its weights and starts fresh optimiser moments.
    histories = {name: list(previous.meta.get(name, [])) for name in HISTORIES}
    return int(previous.meta["epoch"]), histories, best


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for name, value in state.items():
            if torch.is_tensor(value) and name != "step":
                state[name] = value.to(device)


def _train_epoch(model: DeDe, optimizer: torch.optim.Optimizer, aux: AuxData, order: torch.Tensor,
                 generator: torch.Generator, train: TrainConfig, device: torch.device,
                 step: Callable[[int, float], None]) -> float:
    """One pass over `order`; returns the mean training loss."""
    config = model.config
    total, steps = 0.0, 0
    for idx in order.split(train.batch_size):
        x = model.normalize(aux.images[idx].to(device).float().div_(255))
        emb = aux.embeddings[idx].to(device)
        noise = torch.rand(len(idx), config.num_patches, generator=generator).to(device)
        with autocast_for(device):
            loss, _, _ = model(x, emb, noise, config.train_visible)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
        step(len(idx), loss.item())
    return total / steps


def _previous_run(ckpt_path: Path, identity: dict[str, Any], train: TrainConfig) -> tuple[Checkpoint | None, bool]:
    """(the checkpoint already in OUT, whether it is finished for these settings); refuses other settings."""
    if not ckpt_path.exists():
        return None, False
    previous = load_checkpoint(ckpt_path)
    diffs = differences(previous.meta.get("identity", {}), identity)
    if diffs:
        raise ValueError(f"{ckpt_path.parent} holds a run with other settings; use another --out or the same "
                         f"settings. Differences: " + "; ".join(diffs))
    done = stop_reason(previous.meta.get("reliance_history", []), previous.meta.get("epoch", 0), train,
                       previous.meta.get("steps_per_epoch", 1))
    if done is not None and previous.train_state is None:
        log.info(f"{ckpt_path} already trained for {previous.meta['epoch']} epochs ({done}); nothing to do")
        return previous, True
    return previous, False


def _calibration(aux: AuxData, train_idx: torch.Tensor, held_idx: torch.Tensor, train: TrainConfig) -> dict:
    """What the checkpoint keeps of the auxiliary set: the held-out images (thresholds without labels, the
    health check) and a bank of training embeddings (the k-NN score)."""
    return {"keys": [aux.keys[i] for i in held_idx.tolist()], "images": aux.images[held_idx].clone(),
            "embeddings": aux.embeddings[held_idx].clone(),
            "knn_bank": aux.embeddings[train_idx[: train.knn_bank]].half()}


def _measure(model: DeDe, calibration: dict, histories: dict[str, list], device: torch.device) -> None:
    """Append the epoch's held-out error (at the scoring visibility) and embedding reliance to the histories."""
    health = health_check(model, calibration, device)
    # At 0 visible patches the check's own-embedding pass is the held-out error at the scoring visibility.
    held_out = (health.get("own_error") if model.config.score_visible == 0 and health["embedding_reliance"] is not None
                else held_out_error(model, calibration, device))
    histories["held_out_history"].append(held_out)
    histories["reliance_history"].append(health["embedding_reliance"] or 0.0)


def train_detector(*, source: Source, data_id: str, encoder: FrozenEncoder, config: DetectorConfig,
                   train: TrainConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                   workers: int | None = None) -> Path:
    """Train (or resume training) a detector; writes OUT/detector.pt after every epoch and returns its path.

    data_id names the training data (e.g. its path and sample count); a rerun into the same folder resumes
    when the data, encoder and settings match and refuses, naming the differences, when they do not.
    After every epoch the held-out auxiliary images give the reconstruction error at the scoring visibility and
    the embedding reliance (dede_core.detector.health); with `train.epochs` None the reliance decides when to stop
    and the best epoch's weights are kept. The finished checkpoint carries the detector's health check.
    `workers`: decoding processes (None: the cores the model leaves, dede_core.io.loader.decode_workers).
    """
    out_dir, device = Path(out_dir), torch.device(device)
    ckpt_path = out_dir / CHECKPOINT
    identity = run_identity(config=config, train=train, encoder=encoder, data_id=data_id)
    previous, finished = _previous_run(ckpt_path, identity, train)
    if finished:
        return ckpt_path
    encoder = encoder.to(device)
    workers = decode_workers(device) if workers is None else workers
    aux = aux_data(source, data_id, encoder, config, train.max_images, train.embed_chunk, out_dir, device, workers)
    if aux.failed:
        log.warning(f"{len(aux.failed)} auxiliary samples could not be decoded and are left out, "
                    f"e.g. {aux.failed[0][0]}: {aux.failed[0][1]}")
    train_idx, held_idx = split_holdout(aux.keys, train.holdout)
    calibration = _calibration(aux, train_idx, held_idx, train)
    torch.manual_seed(train.seed)
    model = DeDe(config=config, global_dim=encoder.dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    start_epoch, histories, best = _resume(previous, ckpt_path, model, optimizer)
    model.to(device).train()
    _optimizer_to(optimizer, device)
    run = _Run(ckpt_path, model, optimizer, encoder, calibration, identity, train, aux, len(held_idx), device)
    reason, meta = run.epochs(train_idx, start_epoch, histories, best)
    model.eval()
    log.info(f"stopped after epoch {meta['epoch']}: {reason}")
    log.info(describe_health(meta["health"]))
    return ckpt_path


@dataclass
class _Run:
    """One training call's fixed context, so the epoch loop reads as: train, measure, keep the best, save."""

    ckpt_path: Path
    model: DeDe
    optimizer: torch.optim.Optimizer
    encoder: FrozenEncoder
    calibration: dict
    identity: dict[str, Any]
    train: TrainConfig
    aux: AuxData
    held_out: int
    device: torch.device

    def epochs(self, train_idx: torch.Tensor, epoch: int, histories: dict[str, list],
               best: dict[str, torch.Tensor] | None) -> tuple[str, dict[str, Any]]:
        """Train from `epoch` until stop_reason says stop; a checkpoint after every epoch. -> (reason, meta)."""
        train, n = self.train, len(train_idx)
        steps_per_epoch = -(-n // train.batch_size)
        last = train.epochs or train.max_epochs
        progress = Progress(max(last - epoch, 1) * n, desc="training", interval=10.0)
        started, reason = time.perf_counter(), None
        while reason is None:
            generator = _seeded(train.seed, epoch)
            order = train_idx[torch.randperm(n, generator=generator)]
            shown = epoch + 1
            histories["loss_history"].append(_train_epoch(
                self.model, self.optimizer, self.aux, order, generator, train, self.device,
                lambda count, loss: progress.update(count, f"epoch {shown} loss {loss:.4f}")))
            _measure(self.model, self.calibration, histories, self.device)
            epoch += 1
            reason = stop_reason(histories["reliance_history"], epoch, train, steps_per_epoch)
            best_at = best_epoch(histories["reliance_history"], train)
            if best_at == epoch:
                best = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            meta = {"epoch": epoch, "epochs": train.epochs, "images": n, "held_out": self.held_out, **histories,
                    "steps_per_epoch": steps_per_epoch, "undecodable": len(self.aux.failed),
                    "identity": self.identity, "complete": reason is not None}
            if reason is not None:
                if train.epochs is None and best is not None:  # early stopping keeps its best epoch's weights
                    self.model.load_state_dict(best)
                meta |= {"stopped": reason, "best_epoch": best_at,
                         "health": health_check(self.model, self.calibration, self.device)}
            self.save(meta, None if reason is not None else {"optimizer": self.optimizer.state_dict(), "best": best},
                      histories, progress.rate, time.perf_counter() - started)
        return reason, meta

    def save(self, meta: dict[str, Any], train_state: dict | None, histories: dict[str, list], rate: float,
             elapsed: float) -> None:
        content_hash = save_checkpoint(self.ckpt_path, model=self.model, encoder_spec=self.encoder.spec,
                                       encoder_fingerprint=self.encoder.fingerprint, train_state=train_state,
                                       meta=meta, calibration=self.calibration)
        total = "" if self.train.epochs is None else "/" + str(self.train.epochs)
        log.info(f"epoch {meta['epoch']}{total} loss {histories['loss_history'][-1]:.4f} held-out error "
                 f"{histories['held_out_history'][-1]:.4g} embedding reliance {histories['reliance_history'][-1]:.3f}"
                 f" | {rate:.0f} img/s | {format_seconds(elapsed)} | saved {self.ckpt_path} ({content_hash[:12]})")
