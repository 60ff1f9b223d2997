"""One detector load per worker process: later tasks in the same process reuse the loaded models.

A Dask or GPU worker runs many shard tasks; loading the checkpoint and the victim encoder (and moving them to
the GPU) for each would cost more than scoring a small shard. The cache key is the checkpoint's path and the
sha256 of its bytes plus the encoder spec: a checkpoint rewritten in place is loaded (and verified) again. The
cached encoder is the one whose weights were checked against the checkpoint on the first load.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter, OrderedDict
from typing import Any

from dede_core.detector.checkpoint import load_detector

KEEP = 2  # detectors kept per process: a worker serves one run at a time, maybe two during a hand-over
LOADS: Counter = Counter()  # checkpoint path -> loads in this process (what the tests and logs check)
_CACHE: OrderedDict[tuple[str, str, str | None], tuple[Any, Any, Any]] = OrderedDict()
_LOCK = threading.Lock()  # thread-pool tasks of one process share the cache


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_detector_once(path: str | os.PathLike, *, encoder_spec: str | None = None) -> tuple[Any, Any, Any]:
    """checkpoint.load_detector(path, encoder_spec=...), loaded at most once per process for the same bytes."""
    path = os.path.realpath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    key = (path, _file_sha256(path), encoder_spec)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        loaded = load_detector(path, encoder_spec=encoder_spec)
        LOADS[path] += 1
        _CACHE[key] = loaded
        while len(_CACHE) > KEEP:
            _CACHE.popitem(last=False)
        return loaded


def forget_detector(path: str | os.PathLike, *, encoder_spec: str | None = None) -> None:
    """Drop a detector from this process' cache (a one-off call that should not keep it in memory)."""
    path = os.path.realpath(os.fspath(path))
    with _LOCK:
        for key in [k for k in _CACHE if k[0] == path and k[2] == encoder_spec]:
            del _CACHE[key]
