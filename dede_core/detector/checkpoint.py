"""Detector checkpoints: weights, full config, encoder identity and a content hash, loadable without pickle code.

A checkpoint is a torch zip file holding only tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`. A file that would need to execute pickled code to load is refused.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from dede_core.detector.config import DetectorConfig
from dede_core.detector.hashing import tensor_digest
from dede_core.detector.model import DeDe
from dede_core.io import storage

FORMAT = "dede-detector/1"
# Encoder kinds whose spec names Python code to import and call: never run because a checkpoint says so.
CODE_KINDS = ("callable",)


class CheckpointError(ValueError):
    """A file that is not a usable, trustworthy dede checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """What a detector checkpoint holds."""

    config: DetectorConfig  # the detector's architecture and score defaults
    encoder_spec: str  # canonical spec of the victim encoder (dede_core.detector.encoders syntax)
    encoder_fingerprint: str  # sha256 of the encoder's weights when the detector was trained
    global_dim: int  # width D of the encoder's embedding
    state_dict: dict[str, torch.Tensor]  # detector weights
    content_hash: str  # sha256 over weights, config and encoder identity: names the detector
    train_state: dict[str, Any] | None = None  # optimizer state; None once training is complete
    meta: dict[str, Any] = field(default_factory=dict)  # free-form facts: epochs, images seen, losses
    # Held-out auxiliary images (never trained on) for label-free thresholds: keys and uint8 (H, C, S, S).
    calibration_keys: list[str] = field(default_factory=list)
    calibration_images: torch.Tensor | None = None
    # (H, D) float32: the victim's embeddings of those images, from their original bytes at its own input size
    calibration_embeddings: torch.Tensor | None = None
    knn_bank: torch.Tensor | None = None  # (B, D) float16 embeddings of training images, for the k-NN score


def detector_hash(state_dict: dict[str, torch.Tensor], config: DetectorConfig, encoder_spec: str,
                  encoder_fingerprint: str, calibration: dict[str, Any] | None = None) -> str:
    """The content hash stored in (and verified against) a checkpoint: weights, config, encoder, calibration."""
    calibration = calibration or {}
    keys = list(calibration.get("keys", []))
    identity = json.dumps([config.to_dict(), encoder_spec, encoder_fingerprint, keys], sort_keys=True)
    tensors = {f"model.{k}": v for k, v in state_dict.items()}
    tensors.update({f"calibration.{k}": v for k, v in calibration.items() if torch.is_tensor(v)})
    return tensor_digest(tensors, extra=identity)


@contextlib.contextmanager
def _ctrl_c_after() -> Iterator[None]:
    """Hold a Ctrl-C back until the block ends. torch.save interrupted by KeyboardInterrupt raises a RuntimeError
    from its zip writer instead, which would turn a clean "rerun to resume" stop into a crash."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # not ours to manage: another thread, or a handler (or SIG_IGN) somebody else installed
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name in the same folder, then rename: never a partial file at `path`.

    A Ctrl-C during the write takes effect once the file is in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _ctrl_c_after():
        _write_then_rename(obj, path)


def _write_then_rename(obj: Any, path: Path) -> None:
    with storage.AtomicFile(path) as handle:
        torch.save(obj, handle)


def save_checkpoint(path: str | Path, *, model: DeDe, encoder_spec: str, encoder_fingerprint: str,
                    train_state: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                    calibration: dict[str, Any] | None = None) -> str:
    """Write a checkpoint atomically; returns its content hash.

    calibration: {"keys": list[str], "images": uint8 (H, C, S, S), "embeddings": (H, D), "knn_bank": (B, D)}
    or None.
    """
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    content_hash = detector_hash(state_dict, model.config, encoder_spec, encoder_fingerprint, calibration)
    payload = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "encoder_spec": encoder_spec,
        "encoder_fingerprint": encoder_fingerprint,
        "global_dim": model.global_dim,
        "state_dict": state_dict,
        "content_hash": content_hash,
        "train_state": train_state,
        "meta": meta or {},
        "calibration": calibration,
    }
    atomic_torch_save(payload, Path(path))
    return content_hash


def load_payload(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True, turning every way it can fail into a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it contains pickled objects that would run code when loaded "
            f"({str(exc).splitlines()[0]}). Only checkpoints written by dede are accepted."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a dede checkpoint (top level is {type(payload).__name__})")
    return payload


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify a detector checkpoint (format, fields, content hash)."""
    payload = load_payload(path)
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dede detector checkpoint (format {payload.get('format')!r})")
    try:
        config = DetectorConfig.from_dict(payload["config"])
        calibration = payload.get("calibration") or {}
        ckpt = Checkpoint(
            config=config,
            encoder_spec=str(payload["encoder_spec"]),
            encoder_fingerprint=str(payload["encoder_fingerprint"]),
            global_dim=int(payload["global_dim"]),
            state_dict=dict(payload["state_dict"]),
            content_hash=str(payload["content_hash"]),
            train_state=payload.get("train_state"),
            meta=dict(payload.get("meta") or {}),
            calibration_keys=[str(k) for k in calibration.get("keys", [])],
            calibration_images=calibration.get("images"),
            calibration_embeddings=calibration.get("embeddings"),
            knn_bank=calibration.get("knn_bank"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is a damaged dede checkpoint: {exc!r}") from None
    actual = detector_hash(ckpt.state_dict, config, ckpt.encoder_spec, ckpt.encoder_fingerprint, calibration)
    if actual != ckpt.content_hash:
        raise CheckpointError(f"{path} failed its content check (stored {ckpt.content_hash[:12]}, "
                              f"computed {actual[:12]}): the file was altered or damaged")
    return ckpt


def build_detector(ckpt: Checkpoint) -> DeDe:
    """A DeDe model with the checkpoint's weights, in eval mode on the CPU."""
    model = DeDe(config=ckpt.config, global_dim=ckpt.global_dim)
    model.load_state_dict(ckpt.state_dict)
    return model.eval()


def load_detector(path: str | Path, *, encoder_spec: str | None = None):
    """Checkpoint -> (DeDe, FrozenEncoder, Checkpoint), with the encoder it was trained for.

    encoder_spec overrides where the encoder's weights are found (say, another path to the same file); the
    weights must still be the ones the detector was trained on, or loading is refused. A `callable:` encoder
    runs code, so it is loaded only when the caller names it here, never from the checkpoint's own spec.
    """
    from dede_core.detector.encoders import load_encoder, parse_spec  # optional libraries: load them lazily

    ckpt = load_checkpoint(path)
    if encoder_spec is None and parse_spec(ckpt.encoder_spec).kind in CODE_KINDS:
        raise CheckpointError(
            f"the detector {path} names the encoder {ckpt.encoder_spec!r}, which imports and runs Python code; "
            f"dede does not run code named inside a checkpoint: give that encoder spec yourself (dede score "
            f"--encoder SPEC) if you trust the code")
    encoder = load_encoder(encoder_spec or ckpt.encoder_spec)
    if encoder.fingerprint != ckpt.encoder_fingerprint:
        raise CheckpointError(
            f"the encoder {encoder.spec!r} has weights {encoder.fingerprint[:12]}, but the detector {path} was "
            f"trained on weights {ckpt.encoder_fingerprint[:12]}: scores would be meaningless"
        )
    return build_detector(ckpt), encoder, ckpt
