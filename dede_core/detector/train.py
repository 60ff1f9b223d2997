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
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dede_core.detector.checkpoint import Checkpoint, atomic_torch_save, load_checkpoint, load_payload, save_checkpoint
from dede_core.detector.config import DetectorConfig, preset, size_for_side
from dede_core.detector.encoders import FrozenEncoder
from dede_core.detector.health import describe_health, health_check, held_out_error
from dede_core.io.images import image_size
from dede_core.io.loader import make_loader
from dede_core.detector.model import DeDe
from dede_core.io.progress import Progress, format_seconds
from dede_core.detector.scorer import autocast_for
from dede_core.io.sources import Source
from schemas.manifest import differences
from schemas.names import AUX_CACHE, CHECKPOINT

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


@dataclass
class AuxData:
    """Decoded auxiliary images and their cached embeddings."""

    keys: list[str]
    images: torch.Tensor  # (N, C, S, S) uint8
    embeddings: torch.Tensor  # (N, D) float32
    failed: list[tuple[str, str]]  # (key, error) of samples that could not be decoded


def data_id(path: str, keys: list[str]) -> str:
    """Names a training set: its resolved path, size, and a hash of its keys."""
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    return f"{os.path.abspath(path)}|n={len(keys)}|keys={digest}"


def split_holdout(keys: list[str], holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): the held-out ones are the `holdout` keys with the smallest hash,
    so the split depends on the keys alone, not on their order. At most half the set is held out."""
    count = min(holdout, len(keys) // 2)
    ranked = sorted(range(len(keys)), key=lambda i: hashlib.blake2b(keys[i].encode(), digest_size=8).digest())
    held = sorted(ranked[:count])
    return torch.tensor(sorted(ranked[count:]), dtype=torch.long), torch.tensor(held, dtype=torch.long)


def _seeded(seed: int, *parts: int) -> torch.Generator:
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def prepare_aux(source: Source, encoder: FrozenEncoder, config: DetectorConfig, *, limit: int | None,
                chunk: int, workers: int, device: torch.device) -> AuxData:
    """Decode the auxiliary set once, into the detector's view and the victim's own view, and embed the latter."""
    count = len(source) if limit is None else min(limit, len(source))
    subset = source if count == len(source) else _Prefix(source, count)
    keys, images, embeddings, failed = [], [], [], []
    progress = Progress(count, desc="embedding aux images")
    for batch in make_loader(subset, views=(config.view, encoder.view), batch_size=chunk, workers=workers):
        ok = batch["ok"]
        failed += [(k, e) for k, e, good in zip(batch["key"], batch["error"], ok.tolist()) if not good]
        if ok.any():
            victim = batch["views"][1][ok]
            padded = torch.zeros((chunk, *victim.shape[1:]), dtype=torch.uint8)
            padded[: len(victim)] = victim
            with torch.no_grad(), autocast_for(device):
                emb = encoder(padded.to(device).float().div_(255)).float().cpu()
            keys += [k for k, good_ in zip(batch["key"], ok.tolist()) if good_]
            images.append(batch["views"][0][ok])
            embeddings.append(emb[: len(victim)])
        progress.update(len(ok))
    progress.close(f"{len(failed)} undecodable")
    if not keys:
        raise ValueError(f"none of the {count} auxiliary samples could be decoded; first errors: {failed[:3]}")
    return AuxData(keys, torch.cat(images), torch.cat(embeddings), failed)


class _Prefix:
    """The first `count` samples of a source."""

    def __init__(self, source: Source, count: int) -> None:
        self.source, self.count = source, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.source[index]


def run_identity(*, config: DetectorConfig, train: TrainConfig, encoder: FrozenEncoder,
                 data_id: str) -> dict[str, Any]:
    """What must match for a rerun to resume a run; epochs is left out so a run can be extended."""
    settings = dataclasses.asdict(train)
    for name in ("epochs", "max_epochs", "patience", "min_improvement", "min_steps"):  # when to stop: may extend
        settings.pop(name)
    return {"config": config.to_dict(), "train": settings, "encoder_spec": encoder.spec,
            "encoder_fingerprint": encoder.fingerprint, "data": data_id}


def median_side(source: Source, *, sample: int = 256) -> int | None:
    """Median shorter side of up to `sample` images spread through the source, from their headers only;
    None when none of them can be read."""
    if len(source) == 0:
        return None
    picks = sorted({round(i * (len(source) - 1) / max(sample - 1, 1)) for i in range(min(sample, len(source)))})
    sides = []
    for index in picks:
        try:
            width, height = image_size(source[index].data)
        except (ValueError, OSError):  # undecodable samples are reported when the set is embedded
            continue
        sides.append(min(width, height))
    return int(statistics.median_low(sides)) if sides else None


def detector_config(preset_name: str, overrides: dict[str, Any], source: Source) -> tuple[DetectorConfig, str]:
    """The preset with the user's overrides; without an img_size override, the detector's size and patch come
    from the auxiliary images' median side (config.size_for_side). Returns the config and a sentence saying so."""
    if "img_size" in overrides:
        config = preset(preset_name, **overrides)
        return config, f"detector size {config.img_size} px, patch {config.patch_size} (given)"
    side = median_side(source)
    chosen = size_for_side(side) if side else {}
    if "patch_size" in overrides:
        chosen.pop("patch_size", None)
    config = preset(preset_name, **{**chosen, **overrides})
    origin = f"median side of the auxiliary images {side} px" if side else "no readable image: the preset's size"
    return config, f"detector size {config.img_size} px, patch {config.patch_size} (from the {origin})"


def _views_id(config: DetectorConfig, encoder: FrozenEncoder) -> list:
    return [dataclasses.astuple(config.view), dataclasses.astuple(encoder.view)]


def _load_cache(path: Path, data_id: str, encoder: FrozenEncoder, config: DetectorConfig) -> AuxData | None:
    if not path.is_file():
        return None
    payload = load_payload(path)
    if (payload.get("data") != data_id or payload.get("encoder_fingerprint") != encoder.fingerprint
            or payload.get("views") != _views_id(config, encoder)):
        return None
    return AuxData(list(payload["keys"]), payload["images"], payload["embeddings"],
                   [tuple(item) for item in payload["failed"]])


def _aux_data(source: Source, data_id: str, encoder: FrozenEncoder, config: DetectorConfig, train: TrainConfig,
              out_dir: Path, device: torch.device, workers: int) -> AuxData:
    """The decoded and embedded auxiliary set, from OUT/aux_cache.pt when it matches."""
    cache_path = out_dir / AUX_CACHE
    aux = _load_cache(cache_path, data_id, encoder, config)
    if aux is None:
        aux = prepare_aux(source, encoder, config, limit=train.max_images, chunk=train.embed_chunk,
                          workers=workers, device=device)
        atomic_torch_save({"data": data_id, "encoder_fingerprint": encoder.fingerprint,
                           "views": _views_id(config, encoder), "keys": aux.keys, "images": aux.images,
                           "embeddings": aux.embeddings, "failed": [list(item) for item in aux.failed]}, cache_path)
    return aux


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


def train_detector(*, source: Source, data_id: str, encoder: FrozenEncoder, config: DetectorConfig,
                   train: TrainConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                   workers: int = 0) -> Path:
    """Train (or resume training) a detector; writes OUT/detector.pt after every epoch and returns its path.

    data_id names the training data (e.g. its path and sample count); a rerun into the same folder resumes
    when the data, encoder and settings match and refuses, naming the differences, when they do not.
    After every epoch the held-out auxiliary images give the reconstruction error at the scoring visibility and
    the embedding reliance (dede_core.detector.health); with `train.epochs` None the reliance decides when to stop and the
    best epoch's weights are kept. The finished checkpoint carries the detector's health check.
    """
    out_dir, device = Path(out_dir), torch.device(device)
    ckpt_path = out_dir / CHECKPOINT
    identity = run_identity(config=config, train=train, encoder=encoder, data_id=data_id)

    previous: Checkpoint | None = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if previous is not None:
        diffs = differences(previous.meta.get("identity", {}), identity)
        if diffs:
            raise ValueError(f"{out_dir} holds a run with other settings; use another --out or the same "
                             f"settings. Differences: " + "; ".join(diffs))
        done = stop_reason(previous.meta.get("reliance_history", []), previous.meta.get("epoch", 0), train,
                           previous.meta.get("steps_per_epoch", 1))
        if done is not None and previous.train_state is None:
            log.info(f"{ckpt_path} already trained for {previous.meta['epoch']} epochs ({done}); nothing to do")
            return ckpt_path

    encoder = encoder.to(device)
    aux = _aux_data(source, data_id, encoder, config, train, out_dir, device, workers)
    if aux.failed:
        log.warning(f"{len(aux.failed)} auxiliary samples could not be decoded and are left out, "
            f"e.g. {aux.failed[0][0]}: {aux.failed[0][1]}")
    train_idx, held_idx = split_holdout(aux.keys, train.holdout)
    calibration = {
        "keys": [aux.keys[i] for i in held_idx.tolist()],
        "images": aux.images[held_idx].clone(),
        "embeddings": aux.embeddings[held_idx].clone(),
        "knn_bank": aux.embeddings[train_idx[: train.knn_bank]].half(),
    }
    torch.manual_seed(train.seed)
    model = DeDe(config=config, global_dim=encoder.dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    start_epoch, histories, best = _resume(previous, ckpt_path, model, optimizer)
    model.to(device).train()
    _optimizer_to(optimizer, device)

    n, last = len(train_idx), train.epochs or train.max_epochs
    steps_per_epoch = -(-n // train.batch_size)
    progress = Progress(max(last - start_epoch, 1) * n, desc="training", interval=10.0)
    started, epoch, reason = time.perf_counter(), start_epoch, None
    while reason is None:
        generator = _seeded(train.seed, epoch)
        order = train_idx[torch.randperm(n, generator=generator)]
        histories["loss_history"].append(_train_epoch(
            model, optimizer, aux, order, generator, train, device,
            lambda count, loss: progress.update(count, f"epoch {epoch + 1} loss {loss:.4f}")))
        health = health_check(model, calibration, device)
        # At 0 visible patches the check's own-embedding pass is the held-out error at the scoring visibility.
        held_out = (health.get("own_error") if config.score_visible == 0 and health["embedding_reliance"] is not None
                    else held_out_error(model, calibration, device))
        histories["held_out_history"].append(held_out)
        histories["reliance_history"].append(health["embedding_reliance"] or 0.0)
        epoch += 1
        reason = stop_reason(histories["reliance_history"], epoch, train, steps_per_epoch)
        best_at = best_epoch(histories["reliance_history"], train)
        if best_at == epoch:
            best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        meta = {"epoch": epoch, "epochs": train.epochs, "images": n, "held_out": len(held_idx), **histories,
                "steps_per_epoch": steps_per_epoch,
                "undecodable": len(aux.failed), "identity": identity, "complete": reason is not None}
        if reason is not None:
            if train.epochs is None and best is not None:  # early stopping keeps its best epoch's weights
                model.load_state_dict(best)
            meta |= {"stopped": reason, "best_epoch": best_at, "health": health_check(model, calibration, device)}
        train_state = None if reason is not None else {"optimizer": optimizer.state_dict(), "best": best}
        content_hash = save_checkpoint(ckpt_path, model=model, encoder_spec=encoder.spec,
                                       encoder_fingerprint=encoder.fingerprint, train_state=train_state,
                                       meta=meta, calibration=calibration)
        elapsed = time.perf_counter() - started
        log.info(f"epoch {epoch}{'' if train.epochs is None else '/' + str(train.epochs)} loss "
            f"{histories['loss_history'][-1]:.4f} held-out error {histories['held_out_history'][-1]:.4g} "
            f"embedding reliance {histories['reliance_history'][-1]:.3f} | {progress.rate:.0f} img/s | "
            f"{format_seconds(elapsed)} | saved {ckpt_path} ({content_hash[:12]})")
    model.eval()
    log.info(f"stopped after epoch {epoch}: {reason}")
    log.info(describe_health(meta["health"]))
    return ckpt_path
