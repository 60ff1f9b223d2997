"""Decoding samples in DataLoader workers: a failed decode is a row with a status, never a crash."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dede_core.config import DetectorConfig
from dede_core.images import decode_image
from dede_core.sources import Source


class DecodedSamples(Dataset):
    """Map-style dataset over a Source: item i -> {index, key, image (C, S, S) uint8, ok, error}."""

    def __init__(self, source: Source, *, config: DetectorConfig) -> None:
        self.source, self.config = source, config

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cfg = self.config
        blank = torch.zeros(cfg.in_chans, cfg.img_size, cfg.img_size, dtype=torch.uint8)
        key = ""
        try:
            sample = self.source[index]
            key = sample.key
            image = decode_image(sample.data, size=cfg.img_size, channels=cfg.in_chans, fit=cfg.fit)
            return {"index": index, "key": key, "image": image, "ok": True, "error": ""}
        except (ValueError, OSError) as exc:  # undecodable or unreadable sample: data, not a crash
            return {"index": index, "key": key, "image": blank, "ok": False, "error": f"{type(exc).__name__}: {exc}"}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "key": [item["key"] for item in items],
        "image": torch.stack([item["image"] for item in items]),
        "ok": torch.tensor([item["ok"] for item in items], dtype=torch.bool),
        "error": [item["error"] for item in items],
    }


def make_loader(source: Source, *, config: DetectorConfig, batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """Ordered loader (no shuffling): decoding in `workers` processes, batches spanning samples."""
    return DataLoader(
        DecodedSamples(source, config=config),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
