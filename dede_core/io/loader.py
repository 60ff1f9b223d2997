"""Decoding samples in DataLoader workers: a failed decode is a row with a status, never a crash."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dede_core.io.images import View, decode_views
from dede_core.io.sources import Source


class DecodedSamples(Dataset):
    """Map-style dataset over a Source: item i -> {index, key, views (one uint8 (C, S, S) per view), ok, error}.

    Each sample is decoded once and fitted to every view (the detector's, the victim encoder's)."""

    def __init__(self, source: Source, *, views: tuple[View, ...]) -> None:
        self.source, self.views = source, tuple(views)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = ""
        try:
            sample = self.source[index]
            key = sample.key
            views = decode_views(sample.data, self.views)
            return {"index": index, "key": key, "views": views, "ok": True, "error": ""}
        except (ValueError, OSError) as exc:  # undecodable or unreadable sample: data, not a crash
            blank = [torch.zeros(v.channels, v.size, v.size, dtype=torch.uint8) for v in self.views]
            return {"index": index, "key": key, "views": blank, "ok": False, "error": f"{type(exc).__name__}: {exc}"}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "key": [item["key"] for item in items],
        "views": [torch.stack([item["views"][v] for item in items]) for v in range(len(items[0]["views"]))],
        "ok": torch.tensor([item["ok"] for item in items], dtype=torch.bool),
        "error": [item["error"] for item in items],
    }


def make_loader(source: Source, *, views: tuple[View, ...], batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """Ordered loader (no shuffling): decoding in `workers` processes, batches spanning samples."""
    return DataLoader(
        DecodedSamples(source, views=views),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
