"""What the detection benchmark and the generalization suite share: in-memory images as a Source, config hashes,
cached detectors, results and scores, the shipped scores of in-memory images, and one row of a score table."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch import Tensor

from bench import metrics
from bench.ssl import embed_all
from dede_core.detector.config import DetectorConfig
from dede_core.detector.encoders import load_encoder
from dede_core.detector.knn import knn_distance
from dede_core.detector.scorer import ScoreConfig, load_scorer
from dede_core.detector.train import TrainConfig, train_detector
from dede_core.io import storage
from dede_core.io.images import fit_tensor
from dede_core.io.sources import Sample
from dede_core.stages.select import fpr_threshold

LABEL_FREE_FPR = 0.05  # the fpr target of every table's label-free threshold (the product's default rule)


class ArraySource:
    """uint8 images (N, C, H, W) as a Source of PNG-encoded samples (what train_detector reads)."""

    def __init__(self, images: Tensor, prefix: str) -> None:
        self.images, self.prefix = images, prefix
        self.classes, self.skipped = None, []

    def __len__(self) -> int:
        return len(self.images)

    def keys(self) -> list[str]:
        return [f"{self.prefix}_{i:06d}" for i in range(len(self.images))]

    def __getitem__(self, index: int) -> Sample:
        array = self.images[index].permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buf, format="PNG")
        return Sample(key=f"{self.prefix}_{index:06d}", data=buf.getvalue(), label=None, meta={})


def config_digest(*parts: Any) -> str:
    """12 hex digits naming a cached artifact by everything that decides it (JSON of the parts, keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def images_digest(images: Tensor) -> str:
    """16 hex digits of the images' bytes: their identity in cache names."""
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]


def embedder(spec: str) -> Callable[[Tensor], Tensor]:
    """uint8 images -> the encoder's embeddings, 256 images at a time."""
    return functools.partial(embed_all, load_encoder(spec), batch=256)


def fit_detector(cache: Path, name: str, images: Tensor, spec: str, config: DetectorConfig, train: TrainConfig,
                 log: Callable[[str], None]) -> Path:
    """A detector trained on in-memory images, or the one an earlier run trained with the same settings."""
    content = f"array:{name}:{images_digest(images)}"
    out = cache / f"detector-{name}-{config_digest(spec, config.to_dict(), dataclasses.asdict(train), content)}"
    return train_detector(source=ArraySource(images, name), data_id=content, encoder=load_encoder(spec),
                          config=config, train=train, out_dir=out)


def cached_result(stored: Path, compute: Callable[[], dict[str, Any]], log: Callable[[str], None]
                  ) -> dict[str, Any]:
    """A finished result read from `stored`, or computed (its wall time added) and written there whole."""
    if stored.is_file():
        log(f"reusing {stored}")
        return json.loads(stored.read_text())
    t0 = time.perf_counter()
    result = compute()
    result["wall_s"] = time.perf_counter() - t0
    stored.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(stored, json.dumps(result).encode())
    return result


def score_images(path: Path, images: Tensor, score: ScoreConfig = ScoreConfig(), *, knn_k: int = 10,
                 cache: Path | None = None) -> dict[str, np.ndarray]:
    """The shipped scores (score, recon_error, knn_score) of in-memory uint8 images at their native size, each model
    fed its own view as the score stage feeds it, and the same of the checkpoint's held-out calibration images
    (keys prefixed calib_). Kept in `cache/scores` when a cache is given."""
    if cache is not None:
        key = config_digest(hashlib.sha256(path.read_bytes()).hexdigest(),
                            hashlib.sha256(images.numpy().tobytes()).hexdigest(), dataclasses.asdict(score), knn_k)
        stored = cache / "scores" / f"{key}.npz"
        if stored.is_file():
            with np.load(stored) as saved:
                return dict(saved)
    scorer, ckpt = load_scorer(str(path), score)
    bank = ckpt.knn_bank.float() if ckpt.knn_bank is not None else None
    detector_view = fit_tensor(images, scorer.detector.config.view)
    keys = [f"eval_{i:06d}" for i in range(len(images))]
    out = scorer.score(detector_view, keys, victim=fit_tensor(images, scorer.encoder.view))
    calib = scorer.score(ckpt.calibration_images, ckpt.calibration_keys, embedding=ckpt.calibration_embeddings)
    result = {}
    for prefix, part in (("", out), ("calib_", calib)):
        result[prefix + "score"] = part.score.double().numpy()
        result[prefix + "recon_error"] = part.error.double().numpy()
        result[prefix + "knn_score"] = knn_distance(part.embedding, bank, knn_k).double().numpy()
    if cache is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **result)
        storage.write_bytes(stored, buffer.getvalue())
    return result


def table_row(neg: np.ndarray, pos: np.ndarray, calib: np.ndarray | None) -> dict[str, Any]:
    """AUROC and TPR at 1% and 5% FPR of clean (`neg`) against triggered (`pos`) scores; with held-out `calib`
    scores also the threshold `dede clean --fpr 0.05` would take from them and the rates it gives."""
    row: dict[str, Any] = {"auroc": metrics.auroc(neg, pos), "tpr_at_1": metrics.tpr_at_fpr(neg, pos, 0.01),
                           "tpr_at_5": metrics.tpr_at_fpr(neg, pos, 0.05)}
    if calib is not None:
        threshold = fpr_threshold(calib, LABEL_FREE_FPR)
        rates = metrics.rates_at_threshold(neg, pos, threshold)
        row.update(threshold=threshold, label_free_fpr=rates["fpr"], label_free_tpr=rates["tpr"])
    return row
