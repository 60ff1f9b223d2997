"""Reproducible mask noise: a sample's mask is a pure function of (sample key, seed, draw index).

The reference drew masks from global numpy state, so a sample's score depended on batch order and size. Here
each sample gets its own generator, seeded from a hash of its key, so it scores the same in any batch.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def sample_seed(key: str, seed: int, draw: int) -> int:
    """A 63-bit seed derived from (key, seed, draw); stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}\x00{draw}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def mask_noise(keys: list[str], num_patches: int, *, seed: int, draw: int = 0) -> Tensor:
    """Noise (N, L) on the CPU; the patches with the smallest noise stay visible."""
    rows = []
    generator = torch.Generator()
    for key in keys:
        generator.manual_seed(sample_seed(key, seed, draw))
        rows.append(torch.rand(num_patches, generator=generator))
    return torch.stack(rows) if rows else torch.empty(0, num_patches)
