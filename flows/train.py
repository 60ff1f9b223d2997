"""Flow: fit a DeDe detector for a victim encoder on auxiliary images (one task: dede_core.train)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from dede_core.config import preset
from dede_core.encoders import load_encoder
from dede_core.sources import open_source
from dede_core.train import TrainConfig, data_id, train_detector


@task(name="train-detector")
def train_task(data: str, encoder_spec: str, out: str, preset_name: str, train: TrainConfig, device: str,
               workers: int) -> str:
    source = open_source(data)
    keys = source.keys()[: train.max_images] if train.max_images else source.keys()
    path = train_detector(source=source, data_id=data_id(data, keys), encoder=load_encoder(encoder_spec),
                          config=preset(preset_name), train=train, out_dir=out, device=device, workers=workers)
    return str(path)


@flow(name="dede-train")
def train_flow(data: str, encoder: str, out: str, preset_name: str = "cpu", epochs: int = 20,
               batch_size: int = 256, seed: int = 0, max_images: int | None = None, device: str = "cpu",
               workers: int = 0) -> str:
    """Train (or resume) a detector into OUT/detector.pt and return its path."""
    train = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, max_images=max_images)
    return train_task(data, encoder, str(Path(out)), preset_name, train, device, workers)
