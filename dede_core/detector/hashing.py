"""Content hashes for tensors and configs: what identifies a detector or an encoder's weights."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def tensor_digest(tensors: Mapping[str, torch.Tensor], *, extra: str = "") -> str:
    """sha256 hex over sorted names, dtypes, shapes and raw bytes (plus an optional text)."""
    digest = hashlib.sha256(extra.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
