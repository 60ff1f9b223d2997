"""The auxiliary set a detector trains on: decoded once into the detector's view and the victim's own view,
embedded by the frozen victim in fixed-size chunks, cached in the run folder, and split into training and
held-out images by key (the held-out ones calibrate thresholds and measure the detector's health)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dede_core.detector.checkpoint import atomic_torch_save, load_payload
from dede_core.detector.config import DetectorConfig, preset, size_for_side
from dede_core.detector.encoders import FrozenEncoder
from dede_core.detector.scorer import autocast_for
from dede_core.io.images import image_size
from dede_core.io.loader import make_loader
from dede_core.io.progress import Progress
from dede_core.io.sources import Source
from schemas.names import AUX_CACHE

log = logging.getLogger("dede")


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


def aux_data(source: Source, data_id: str, encoder: FrozenEncoder, config: DetectorConfig, limit: int | None,
             chunk: int, out_dir: Path, device: torch.device, workers: int) -> AuxData:
    """The decoded and embedded auxiliary set (its first `limit` samples), from OUT/aux_cache.pt when it matches."""
    cache_path = out_dir / AUX_CACHE
    aux = _load_cache(cache_path, data_id, encoder, config)
    if aux is None:
        aux = prepare_aux(source, encoder, config, limit=limit, chunk=chunk, workers=workers, device=device)
        atomic_torch_save({"data": data_id, "encoder_fingerprint": encoder.fingerprint,
                           "views": _views_id(config, encoder), "keys": aux.keys, "images": aux.images,
                           "embeddings": aux.embeddings, "failed": [list(item) for item in aux.failed]}, cache_path)
    return aux
