"""Shared fixtures: tiny images, a tiny frozen victim encoder saved to disk, small thread counts."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
torch.set_num_threads(1)  # tiny models: a second thread only adds contention

from flows.cli import log_to_stderr  # noqa: E402

log_to_stderr()  # library messages on stderr as the `dede` command prints them


class _Callback(logging.Handler):
    def __init__(self, callback) -> None:
        super().__init__()
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        self.callback(record.getMessage())  # what it raises (a KeyboardInterrupt) reaches the library call


@contextlib.contextmanager
def on_dede_log(callback):
    """Call callback(message) for each message of the `dede` logger inside the block."""
    handler = _Callback(callback)
    logging.getLogger("dede").addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger("dede").removeHandler(handler)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def encoder_weights(tmp_path_factory) -> Path:
    """A width-8 CIFAR ResNet-18 with fixed random weights, saved as a state_dict."""
    from dede_core.detector.encoders import cifar_resnet18

    torch.manual_seed(1234)
    model = cifar_resnet18(width=8)
    path = tmp_path_factory.mktemp("encoder") / "enc.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def encoder_spec(encoder_weights) -> str:
    return f"cifar-resnet18?width=8&weights={encoder_weights}"


@pytest.fixture(scope="session")
def encoder(encoder_spec):
    from dede_core.detector.encoders import load_encoder

    return load_encoder(encoder_spec)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n uint8 RGB images (n, 3, size, size) with some structure (blobs), so a decoder can learn them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((n, 3, size, size), dtype=np.float64)
    for i in range(n):
        for _ in range(3):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(3, size / 3)]
            color = rng.uniform(0, 1, 3)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            out[i] += color[:, None, None] * blob
    return torch.from_numpy((np.clip(out, 0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """48 PNGs in two class folders."""
    root = tmp_path_factory.mktemp("images")
    images = smooth_images(48, seed=7)
    for i, img in enumerate(images):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        (folder / f"img_{i:03d}.png").write_bytes(buf.getvalue())
    return root


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect server for the whole session (it takes ~20 s to start here)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory, image_folder, encoder) -> str:
    """A one-epoch detector with a 1-block ViT, trained on image_folder (for stage and scale-out tests)."""
    from dede_core.detector.config import cpu
    from dede_core.io.sources import open_source
    from dede_core.detector.train import TrainConfig, train_detector

    tiny = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    path = train_detector(source=open_source(str(image_folder)), data_id="tiny", encoder=encoder,
                          config=cpu(**tiny), train=TrainConfig(epochs=1, batch_size=16, holdout=6, knn_bank=30),
                          out_dir=tmp_path_factory.mktemp("tiny-detector"))
    return str(path)
