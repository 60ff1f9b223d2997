"""Flow: fit a DeDe detector for a victim encoder on auxiliary images (one task: dede_core.detector.train)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from dede_core.detector.encoders import load_encoder
from dede_core.detector.aux import data_id, detector_config
from dede_core.detector.train import TrainConfig, train_detector
from dede_core.io.sources import open_source


@dataclass(frozen=True)
class TrainSettings:
    """Which detector is trained and how: a preset, overrides of its DetectorConfig fields, the optimisation."""

    preset: str = "cpu"  # cpu | paper (dede_core.detector.config)
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"in_chans": 1, "fit": "pad"}
    train: TrainConfig = field(default_factory=TrainConfig)


@task(name="train-detector", cache_policy=NONE)
def train_task(data: str, encoder_spec: str, out: str, settings: TrainSettings, device: str,
               workers: int | None) -> str:
    source = open_source(data)
    train = settings.train
    keys = source.keys()[: train.max_images] if train.max_images else source.keys()
    config, size_note = detector_config(settings.preset, dict(settings.overrides), source)
    get_run_logger().info(size_note)
    path = train_detector(source=source, data_id=data_id(data, keys), encoder=load_encoder(encoder_spec),
                          config=config, train=train, out_dir=out, device=device, workers=workers)
    return str(path)


@flow(name="dede-train")
def train_flow(data: str, encoder: str, out: str, settings: TrainSettings = TrainSettings(), device: str = "cpu",
               workers: int | None = None) -> str:
    """Train (or resume) a detector into OUT/detector.pt and return its path."""
    return train_task(data, encoder, str(Path(out)), settings, device, workers)
