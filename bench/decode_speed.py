"""Decoding one sample: dede's decoder (PIL) against torchvision.io (issue #15, item 2), one thread, side by side.

For each case (a format, a stored side and the view side the models take), `samples` encoded images are decoded
`reps` times over by both paths, each the whole way to the uint8 views a batch needs:
  dede         dede_core.io.images.decode_sample: PIL decode (JPEG with draft(): libjpeg's DCT scaling to at
               least the view's side), EXIF orientation, the detector's and the victim's views
  torchvision  torchvision.io.decode_image (EXIF orientation applied), then resize of the shorter side
               (antialiased bilinear) and a centre crop per view: the same work, torch ops in place of PIL's
and, for reference, each library's bare decode (no views). Images: Fashion-MNIST digits upscaled (PNG, as the
score benchmarks use) and noisy RGB photos-alike (JPEG, quality 90). Milliseconds an image, median of `rounds`.
"""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io as tio
import torchvision.transforms.v2.functional as TF
from PIL import Image

from bench.datasets import load_fashion_mnist
from dede_core.io.images import View, decode_sample

# (format, stored side, view side): the score benchmarks' PNGs, a 224-px JPEG corpus, photos for a 96-px detector.
CASES = (("PNG", 32, 32), ("PNG", 224, 224), ("JPEG", 224, 224), ("JPEG", 500, 224), ("JPEG", 1024, 96))


@dataclass(frozen=True)
class DecodeSpeedConfig:
    samples: int = 50
    reps: int = 4
    rounds: int = 3


def _images(fmt: str, side: int, n: int) -> list[bytes]:
    rng, out = np.random.default_rng(0), []
    if fmt == "PNG":
        digits, _ = load_fashion_mnist("train")
        x = torch.from_numpy(np.pad(digits[:n], ((0, 0), (2, 2), (2, 2))))[:, None].float()
        pixels = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)[:, 0].round().clamp(0, 255)
        arrays = pixels.to(torch.uint8).numpy()
    else:
        base = rng.normal(128, 40, (-(-side // 8), -(-side // 8), 3))  # 8x8 blocks of colour, with noise
        arrays = [np.kron(base + rng.normal(0, 12, base.shape), np.ones((8, 8, 1)))[:side, :side]
                  + rng.normal(0, 6, (side, side, 3)) for _ in range(n)]
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(array).clip(0, 255).astype(np.uint8)).save(buffer, fmt, **(
            {"quality": 90} if fmt == "JPEG" else {}))
        out.append(buffer.getvalue())
    return out


def _torchvision_views(data: bytes, views: tuple[View, ...]) -> list[torch.Tensor]:
    image = tio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), apply_exif_orientation=True)
    out = []
    for view in views:
        fitted = TF.center_crop(TF.resize(image, [view.size], antialias=True), [view.size])
        if view.channels == 3 and fitted.shape[0] == 1:
            fitted = fitted.expand(3, -1, -1)
        out.append(TF.rgb_to_grayscale(fitted) if view.channels == 1 and fitted.shape[0] == 3 else fitted)
    return out


def _ms(function: Callable[[bytes], Any], data: list[bytes], cfg: DecodeSpeedConfig) -> float:
    function(data[0])  # warm-up
    rounds = []
    for _ in range(cfg.rounds):
        start = time.perf_counter()
        for _ in range(cfg.reps):
            for item in data:
                function(item)
        rounds.append((time.perf_counter() - start) / (cfg.reps * len(data)) * 1e3)
    return statistics.median(rounds)


def measure(cfg: DecodeSpeedConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every case's milliseconds an image, by path; one torch thread (a decoding process runs one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started, cases = time.perf_counter(), {}
    try:
        for fmt, side, size in CASES:
            data = _images(fmt, side, cfg.samples)
            views = (View(size, 1), View(size, 3))
            row = {"bytes": statistics.median(len(d) for d in data),
                   "dede_ms": _ms(lambda d: decode_sample(d, views), data, cfg),
                   "torchvision_ms": _ms(lambda d: _torchvision_views(d, views), data, cfg),
                   "pil_bare_ms": _ms(lambda d: Image.open(io.BytesIO(d)).load(), data, cfg),
                   "torchvision_bare_ms": _ms(lambda d: tio.decode_image(torch.frombuffer(bytearray(d), dtype=torch.uint8)),
                                              data, cfg)}
            cases[f"{fmt} {side}px -> {size}px"] = row
            log(f"{fmt} {side}px -> {size}: dede {row['dede_ms']:.3f} ms, torchvision {row['torchvision_ms']:.3f} ms")
    finally:
        torch.set_num_threads(threads)
    return {"kind": "decode-speed", "config": asdict(cfg), "cases": cases, "wall_s": time.perf_counter() - started,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    """python -m bench.decode_speed [--out DIR]: measure, then add the section to OUT/throughput.md and .json."""
    import argparse

    from bench.throughput_report import machine, write_report

    parser = argparse.ArgumentParser(prog="python -m bench.decode_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=DecodeSpeedConfig.samples)
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    report = measure(DecodeSpeedConfig(samples=args.samples))
    report |= {"machine": machine(), "command": "python -m bench.decode_speed " + " ".join(argv or [])}
    md, js = write_report("decode-speed", report, args.out)
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(__import__("sys").argv[1:]))
