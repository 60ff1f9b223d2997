"""Fine-tune a linear probe on what dede kept, filtered while loading: no cleaned copy of the corpus needed.

    dede sanitize corpus/ --encoder SPEC --out run --no-copy
    python examples/finetune_filtered.py run --encoder SPEC --epochs 3

The corpus streams from run/shards (or from the corpus' own WebDataset shards: --shards 'src/{0000..0009}.tar')
through webdataset; `dede_core.webdataset_filter(run)` keeps the samples dede kept, reading the run's verdicts
once, lazily (the run may be an fsspec URL). Each image goes through the frozen encoder and a linear layer
learns the labels (.cls) on top of the embeddings.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dede_core import Verdicts, webdataset_filter
from dede_core.detector.encoders import load_encoder

IMAGE_EXTENSIONS = "png;jpg;jpeg;webp;bmp;gif;tif;tiff"


def stream(urls: str | list[str], verdicts: Verdicts, size: int, batch_size: int) -> wds.WebDataset:
    """(keys, images (N, 3, size, size) in [0, 1], labels) batches of the kept samples, in shard order."""

    def to_tensor(image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
        return torch.from_numpy(pixels / 255.0).permute(2, 0, 1)

    return (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            .select(webdataset_filter(verdicts))  # the load-time filter: skip what dede dropped
            .decode("pil")
            .to_tuple("__key__", IMAGE_EXTENSIONS, "cls")
            .map_tuple(str, to_tensor, int)
            .batched(batch_size, partial=True))


def finetune(run: str, encoder_spec: str, *, shards: str | None = None, epochs: int = 3, batch_size: int = 32,
             lr: float = 0.01, seed: int = 0) -> dict:
    """Train a linear probe on the frozen encoder's embeddings of the kept samples; returns the keys it
    trained on, the loss per epoch and the probe's training accuracy."""
    urls = shards or sorted(glob.glob(os.path.join(run, "shards", "*.tar")))
    if not urls:
        raise ValueError(f"no shards under {run}/shards; pass --shards")
    verdicts = Verdicts(run)  # read once, on first use, by the filter and for the number of classes
    labels = [v for v in verdicts.kept().column("label").to_pylist() if v is not None]
    if not labels:
        raise ValueError(f"the samples kept in {run} carry no labels (.cls); a probe needs them")
    encoder = load_encoder(encoder_spec)
    torch.manual_seed(seed)
    probe = torch.nn.Linear(encoder.dim, max(labels) + 1)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    losses, seen, correct = [], [], 0
    for epoch in range(epochs):
        total, count, correct = 0.0, 0, 0
        for keys, images, labels in stream(urls, verdicts, encoder.input_size, batch_size):
            features, labels = encoder(images), torch.as_tensor(labels)
            logits = probe(features)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(keys), count + len(keys)
            correct += int((logits.argmax(1) == labels).sum())
            if epoch == 0:
                seen += keys
        losses.append(total / max(count, 1))
    return {"keys": seen, "losses": losses, "accuracy": correct / max(len(seen), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a dede sanitize run folder (or a dede clean folder), local or fsspec URL")
    parser.add_argument("--encoder", required=True, help="frozen encoder spec (docs/encoders.md)")
    parser.add_argument("--shards", help="tar shards to stream, e.g. 'src/{0000..0009}.tar' (default RUN/shards/*.tar)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    result = finetune(args.run, args.encoder, shards=args.shards, epochs=args.epochs, batch_size=args.batch_size)
    print(f"trained on {len(result['keys'])} kept samples; loss per epoch "
          f"{', '.join(f'{v:.3f}' for v in result['losses'])}; training accuracy {result['accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
