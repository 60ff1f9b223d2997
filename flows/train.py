"""Flow: fit a DeDe detector for a victim encoder on auxiliary images (one task: dede_core.detector.train)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from dede_core.detector.encoders import load_encoder
from dede_core.io.sources import open_source
from dede_core.detector.aux import data_id, detector_config
from dede_core.detector.train import TrainConfig, train_detector


@task(name="train-detector", cache_policy=NONE)
def train_task(data: str, encoder_spec: str, out: str, preset_name: str, overrides: dict[str, Any],
               train: TrainConfig, device: str, workers: int) -> str:
    source = open_source(data)
    keys = source.keys()[: train.max_images] if train.max_images else source.keys()
    config, size_note = detector_config(preset_name, overrides, source)
    get_run_logger().info(size_note)
    path = train_detector(source=source, data_id=data_id(data, keys), encoder=load_encoder(encoder_spec),
                          config=config, train=train, out_dir=out, device=device, workers=workers)
    return str(path)


@flow(name="dede-train")
def train_flow(data: str, encoder: str, out: str, preset_name: str = "cpu", epochs: int | None = None,
               max_epochs: int = 100, patience: int = 8, batch_size: int = 64, seed: int = 0,
               max_images: int | None = None, device: str = "cpu",
               workers: int = 0, overrides: dict[str, Any] | None = None) -> str:
    """Train (or resume) a detector into OUT/detector.pt and return its path.

    overrides: DetectorConfig fields that replace the preset's (e.g. {"in_chans": 1, "fit": "pad"}).
    """
    train = TrainConfig(epochs=epochs, max_epochs=max_epochs, patience=patience, batch_size=batch_size, seed=seed,
                        max_images=max_images)
    return train_task(data, encoder, str(Path(out)), preset_name, dict(overrides or {}), train, device, workers)
