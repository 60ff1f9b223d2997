"""The one decode Dataset: every stage, training and the throughput benchmark decode samples through it.

A sample that cannot be read or decoded becomes an item with a status and an error, never a crash: the score
stage writes it as a row (styles 8), training leaves it out and lists it.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dede_core.io.images import ImageDecodeError, View, decode_sample
from dede_core.io.sources import Source
from schemas.tables import STATUS_DECODE_ERROR, STATUS_OK, STATUS_READ_ERROR

TENSORS = "views"  # the one item field that is stacked into a batch; every other field becomes a list


class DecodedSamples(Dataset):
    """Map-style dataset over one or more Sources, end to end: item i -> {index, part, position, key, label,
    width, height, status, error, ok, views (one uint8 (C, S, S) tensor per view)}.

    `part` and `position` say which source and which sample of it the item is. Each sample is decoded once and
    fitted to every view (the detector's, the victim encoder's)."""

    def __init__(self, sources: Source | Sequence[Source], *, views: tuple[View, ...]) -> None:
        self.sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
        self.starts = [int(s) for s in np.cumsum([0] + [len(s) for s in self.sources])]
        self.views = tuple(views)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        part = bisect.bisect_right(self.starts, index) - 1
        position = index - self.starts[part]
        item = {"index": index, "part": part, "position": position, "key": "", "label": None, "width": None,
                "height": None, "status": STATUS_OK, "error": None, "ok": True,
                TENSORS: [torch.zeros(v.channels, v.size, v.size, dtype=torch.uint8) for v in self.views]}
        try:
            sample = self.sources[part][position]
        except (OSError, ValueError) as exc:  # an unreadable sample: data, not a crash
            return item | {"status": STATUS_READ_ERROR, "error": f"{type(exc).__name__}: {exc}", "ok": False}
        item |= {"key": sample.key, "label": sample.label}
        try:
            item[TENSORS], (item["width"], item["height"]) = decode_sample(sample.data, self.views)
        except ImageDecodeError as exc:
            return item | {"status": STATUS_DECODE_ERROR, "error": str(exc), "ok": False}
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the views, keep every other field as a list; `index` and `ok` as tensors (what training masks with)."""
    batch = {name: [item[name] for item in items] for name in items[0] if name != TENSORS}
    batch[TENSORS] = [torch.stack([item[TENSORS][v] for item in items]) for v in range(len(items[0][TENSORS]))]
    batch["index"] = torch.tensor(batch["index"], dtype=torch.long)
    batch["ok"] = torch.tensor(batch["ok"], dtype=torch.bool)
    return batch


MAX_DECODE_WORKERS = 8


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or a pinned worker's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_workers(device: str | torch.device, *, cores: int | None = None, threads: int | None = None) -> int:
    """How many decoding processes to start beside the model: the cores the model leaves, at most
    MAX_DECODE_WORKERS.

    On CUDA the model leaves every core but this process's own. On the CPU it runs on torch's threads (`threads`,
    default torch.get_num_threads(): all the cores unless told otherwise), so the cores beyond them, and at least
    one process when there are two cores or more, to overlap decoding with the model's serial stretches (Python
    between operators, single-threaded operators) rather than add its time to the model's. On 2 cores with 2 torch
    threads, one process and none measured within each other's run-to-run spread (docs/results/throughput.md,
    issue #15): decoding is 2-7% of the model's time there, and the count matters where it is larger.
    """
    cores = usable_cores() if cores is None else cores
    if torch.device(device).type == "cuda":
        return max(0, min(MAX_DECODE_WORKERS, cores - 1))
    threads = torch.get_num_threads() if threads is None else threads
    return max(0, min(MAX_DECODE_WORKERS, max(min(1, cores - 1), cores - threads)))


def make_loader(sources: Source | Sequence[Source], *, views: tuple[View, ...], batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """Ordered loader (no shuffling): decoding in `workers` processes, batches spanning samples and sources."""
    return DataLoader(
        DecodedSamples(sources, views=views),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
