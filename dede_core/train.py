"""Fitting the DeDe decoder on auxiliary images, with per-epoch checkpoints and resume.

The victim is frozen and there is no augmentation, so every image's embedding is the same in every epoch:
it is computed once, in fixed-size chunks, and cached with the decoded images in the run folder.
Epoch order and mask noise come from generators seeded by (seed, epoch), so a resumed run takes the same
steps as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dede_core.checkpoint import Checkpoint, atomic_torch_save, load_checkpoint, load_payload, save_checkpoint
from dede_core.config import DetectorConfig
from dede_core.encoders import FrozenEncoder
from dede_core.loader import make_loader
from dede_core.model import DeDe
from dede_core.progress import Progress, format_seconds
from dede_core.scoring import autocast_for
from dede_core.sources import Source
from schemas.manifest import differences

CHECKPOINT_NAME = "detector.pt"
CACHE_NAME = "aux_cache.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (reference: Adam lr 1e-3, wd 1e-6, batch 256, 200 epochs)."""

    epochs: int = 200  # total epochs; raising it on a rerun continues a finished run
    batch_size: int = 256  # images per optimiser step
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-6  # Adam weight decay
    seed: int = 0  # weight init, epoch order and training masks
    max_images: int | None = None  # use only the first N samples of the source (in its stable order)
    embed_chunk: int = 64  # rows per encoder pass while caching embeddings
    holdout: int = 500  # aux samples kept out of training, stored in the checkpoint for label-free thresholds
    knn_bank: int = 5000  # training embeddings stored in the checkpoint for the k-NN score

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "embed_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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
    """Decode the auxiliary set once and embed it with the frozen victim."""
    count = len(source) if limit is None else min(limit, len(source))
    subset = source if count == len(source) else _Prefix(source, count)
    keys, images, embeddings, failed = [], [], [], []
    progress = Progress(count, desc="embedding aux images")
    for batch in make_loader(subset, config=config, batch_size=chunk, workers=workers):
        ok = batch["ok"]
        failed += [(k, e) for k, e, good in zip(batch["key"], batch["error"], ok.tolist()) if not good]
        if ok.any():
            good = batch["image"][ok]
            padded = torch.zeros((chunk, *good.shape[1:]), dtype=torch.uint8)
            padded[: len(good)] = good
            with torch.no_grad(), autocast_for(device):
                emb = encoder(padded.to(device).float().div_(255)).float().cpu()
            keys += [k for k, good_ in zip(batch["key"], ok.tolist()) if good_]
            images.append(good)
            embeddings.append(emb[: len(good)])
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
    settings.pop("epochs")
    return {"config": config.to_dict(), "train": settings, "encoder_spec": encoder.spec,
            "encoder_fingerprint": encoder.fingerprint, "data": data_id}


def _load_cache(path: Path, data_id: str, encoder: FrozenEncoder) -> AuxData | None:
    if not path.is_file():
        return None
    payload = load_payload(path)
    if payload.get("data") != data_id or payload.get("encoder_fingerprint") != encoder.fingerprint:
        return None
    return AuxData(list(payload["keys"]), payload["images"], payload["embeddings"],
                   [tuple(item) for item in payload["failed"]])


def train_detector(*, source: Source, data_id: str, encoder: FrozenEncoder, config: DetectorConfig,
                   train: TrainConfig, out_dir: str | Path, device: str | torch.device = "cpu",
                   workers: int = 0, log: Callable[[str], None] | None = None) -> Path:
    """Train (or resume training) a detector; writes OUT/detector.pt after every epoch and returns its path.

    data_id names the training data (e.g. its path and sample count); a rerun into the same folder resumes
    when the data, encoder and settings match and refuses, naming the differences, when they do not.
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    out_dir, device = Path(out_dir), torch.device(device)
    ckpt_path = out_dir / CHECKPOINT_NAME
    identity = run_identity(config=config, train=train, encoder=encoder, data_id=data_id)

    previous: Checkpoint | None = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if previous is not None:
        old = previous.meta.get("identity", {})
        diffs = differences(old, identity)
        if diffs:
            raise ValueError(f"{out_dir} holds a run with other settings; use another --out or the same "
                             f"settings. Differences: " + "; ".join(diffs))
        if previous.meta.get("epoch", 0) >= train.epochs:
            log(f"{ckpt_path} already trained for {previous.meta['epoch']} epochs; nothing to do")
            return ckpt_path

    encoder = encoder.to(device)
    cache_path = out_dir / CACHE_NAME
    aux = _load_cache(cache_path, data_id, encoder)
    if aux is None:
        aux = prepare_aux(source, encoder, config, limit=train.max_images, chunk=train.embed_chunk,
                          workers=workers, device=device)
        atomic_torch_save({"data": data_id, "encoder_fingerprint": encoder.fingerprint, "keys": aux.keys,
                           "images": aux.images, "embeddings": aux.embeddings,
                           "failed": [list(item) for item in aux.failed]}, cache_path)
    if aux.failed:
        log(f"warning: {len(aux.failed)} auxiliary samples could not be decoded and are left out, "
            f"e.g. {aux.failed[0][0]}: {aux.failed[0][1]}")

    train_idx, held_idx = split_holdout(aux.keys, train.holdout)
    calibration = {
        "keys": [aux.keys[i] for i in held_idx.tolist()],
        "images": aux.images[held_idx].clone(),
        "knn_bank": aux.embeddings[train_idx[: train.knn_bank]].half(),
    }
    torch.manual_seed(train.seed)
    model = DeDe(config=config, global_dim=encoder.dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    start_epoch, history = 0, []
    if previous is not None and previous.train_state is not None:
        model.load_state_dict(previous.state_dict)
        optimizer.load_state_dict(previous.train_state["optimizer"])
        start_epoch, history = int(previous.meta["epoch"]), list(previous.meta.get("loss_history", []))
        log(f"resuming {ckpt_path} after epoch {start_epoch}")
    elif previous is not None:  # a finished run being extended: fresh optimiser moments, same weights
        model.load_state_dict(previous.state_dict)
        start_epoch, history = int(previous.meta["epoch"]), list(previous.meta.get("loss_history", []))
    model.to(device).train()
    for state in optimizer.state.values():
        for name, value in state.items():
            if torch.is_tensor(value) and name != "step":
                state[name] = value.to(device)

    n = len(train_idx)
    progress = Progress((train.epochs - start_epoch) * n, desc="training", interval=10.0)
    started = time.perf_counter()
    for epoch in range(start_epoch, train.epochs):
        generator = _seeded(train.seed, epoch)
        order = train_idx[torch.randperm(n, generator=generator)]
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
            progress.update(len(idx), f"epoch {epoch + 1}/{train.epochs} loss {loss.item():.4f}")
        history.append(total / steps)
        finished = epoch + 1 == train.epochs
        meta = {"epoch": epoch + 1, "epochs": train.epochs, "images": n, "held_out": len(held_idx),
                "loss_history": history,
                "undecodable": len(aux.failed), "identity": identity, "complete": finished}
        train_state = None if finished else {"optimizer": optimizer.state_dict()}
        content_hash = save_checkpoint(ckpt_path, model=model, encoder_spec=encoder.spec,
                                       encoder_fingerprint=encoder.fingerprint, train_state=train_state,
                                       meta=meta, calibration=calibration)
        elapsed = time.perf_counter() - started
        done_epochs = epoch + 1 - start_epoch
        left = elapsed / done_epochs * (train.epochs - epoch - 1)
        log(f"epoch {epoch + 1}/{train.epochs} loss {history[-1]:.4f} | {progress.rate:.0f} img/s | "
            f"left {format_seconds(left)} | saved {ckpt_path} ({content_hash[:12]})")
    return ckpt_path
