"""Cost against corpus size (issue #15, item 3): the score stage at sizes 10x apart, each in a fresh process.

Corpus: 32x32 Fashion-MNIST PNGs (train, then test, then the train images mirrored left-right once those run
out, so 100,000 images are real pictures without exact duplicates), sharded by the shard stage; the smaller
corpora are the first N images of the same folder. Each size is scored by score_shards in its own fresh process
(bench.throughput.measure_in_child), so each peak RSS is its own. Reported per size:
  rate         images / the stage's wall time, detector load and worker start included
  steady rate  images after the first finished shard / the time between the first and the last shard markers
               (their mtimes): the per-image cost without the fixed start
  CPU / image  CPU time (user + system) of the scoring process and its decoding workers per image, start
               included: the cost that other jobs on the same cores hardly disturb, unlike the two rates
  peak RSS     ru_maxrss of the scoring process and of its largest decoding worker
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from bench import throughput as bt
from bench import throughput_report
from bench.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, write_image_folder
from dede_core.stages.shard import write_shards


@dataclass(frozen=True)
class SizeScaleConfig:
    """One cost-against-size setting; saved with its numbers."""

    sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    encoder: str = "cifar-resnet18?width=16"  # a light victim, so the 100k run takes minutes on 2 cores
    batch_size: int = 256
    chunk: int = 64
    workers: int = 1
    samples_per_shard: int = 250  # the smallest corpus still has 4 shards (the steady rate needs two markers)

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or min(self.sizes) < 2 * self.samples_per_shard:
            raise ValueError(f"sizes needs two or more corpora of at least 2 shards "
                             f"({2 * self.samples_per_shard} images); got {self.sizes}")
        if max(self.sizes) > 130_000:
            raise ValueError(f"sizes go up to 130,000 (Fashion-MNIST train + test, and train mirrored); "
                             f"got {self.sizes}")


def fashion_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8, 32x32, zero-padded): train, test, then the train images mirrored left-right."""
    train, train_labels = load_fashion_mnist("train")
    test, test_labels = load_fashion_mnist("test")
    images = np.concatenate([train, test, train[:, :, ::-1]])[:n]
    labels = np.concatenate([train_labels, test_labels, train_labels])[:n]
    return np.pad(images, ((0, 0), (2, 2), (2, 2))), labels


def _steady(scores: str) -> float:
    """Images per second between the first and the last shard markers, less the first shard's rows."""
    import json

    done = os.path.join(scores, "_done")
    markers = sorted((os.stat(os.path.join(done, n)).st_mtime_ns, n) for n in os.listdir(done) if n.endswith(".json"))
    with open(os.path.join(done, markers[0][1])) as f:
        first_rows = json.load(f)["rows"]
    total = 0
    for _, name in markers:
        with open(os.path.join(done, name)) as f:
            total += json.load(f)["rows"]
    return (total - first_rows) / max((markers[-1][0] - markers[0][0]) / 1e9, 1e-9)


def measure(cfg: SizeScaleConfig, work: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every size, smallest first, each scored in a fresh process."""
    started = time.perf_counter()
    images, labels = fashion_images(max(cfg.sizes))
    bench = bt.ThroughputConfig(encoder=cfg.encoder, images=max(cfg.sizes), batch_size=cfg.batch_size,
                                chunk=cfg.chunk, workers=cfg.workers, samples_per_shard=cfg.samples_per_shard)
    detector = bt.write_detector(work, bench)
    rows = {}
    for n in sorted(cfg.sizes):
        folder, shards = os.path.join(work, f"png-{n}"), os.path.join(work, f"shards-{n}")
        write_image_folder(images[:n], labels[:n], folder, class_names=FASHION_MNIST_CLASSES, prefix="fm")
        write_shards(folder, shards, samples_per_shard=cfg.samples_per_shard, progress=False)
        scores = os.path.join(work, f"scores-{n}")
        step = bt.stage_step(shards, detector, scores, replace(bench, images=n))
        run = bt.measure_in_child(replace(bench, images=n), [step])[0]
        run["steady_images_per_s"] = _steady(scores)
        run["cpu_ms_per_image"] = run["cpu_seconds"] / run["images"] * 1e3
        rows[str(n)] = run
        log(f"{n} images: {run['images_per_s']:.1f} img/s ({run['steady_images_per_s']:.1f} steady, "
            f"{run['cpu_ms_per_image']:.2f} CPU-ms an image), peak RSS "
            f"{run['peak_rss_mib']:.0f} MiB (worker {run['worker_peak_rss_mib']:.0f})")
    big, small = rows[str(max(cfg.sizes))], rows[str(min(cfg.sizes))]
    spread = lambda key: max(r[key] for r in rows.values()) / min(r[key] for r in rows.values())  # noqa: E731
    return {"kind": "size-scale", "config": asdict(cfg), "sizes": rows, "corpus": "Fashion-MNIST train + test + "
            "train mirrored, 32x32 PNG", "ratios": {
                "steady_max_over_min": spread("steady_images_per_s"), "rate_max_over_min": spread("images_per_s"),
                "cpu_per_image_max_over_min": spread("cpu_ms_per_image"),
                "peak_rss_largest_over_smallest": big["peak_rss_mib"] / small["peak_rss_mib"],
                "worker_rss_largest_over_smallest": big["worker_peak_rss_mib"] / small["worker_peak_rss_mib"]},
            "wall_s": time.perf_counter() - started, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    """python -m bench.size_scale [--sizes 1000,10000,100000] --out DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.size_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated corpus sizes")
    parser.add_argument("--encoder", default=SizeScaleConfig.encoder)
    parser.add_argument("--samples-per-shard", type=int, default=SizeScaleConfig.samples_per_shard)
    parser.add_argument("--workers", type=int, default=SizeScaleConfig.workers)
    parser.add_argument("--work", default=None, help="scratch parent folder (default: the system's temp folder)")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    cfg = SizeScaleConfig(sizes=tuple(int(s) for s in args.sizes.split(",")), encoder=args.encoder,
                          samples_per_shard=args.samples_per_shard, workers=args.workers)
    with tempfile.TemporaryDirectory(prefix="dede-size-scale-", dir=args.work) as work:
        report = measure(cfg, work)
    report |= {"machine": throughput_report.machine(), "command": "python -m bench.size_scale " + " ".join(argv or [])}
    md, js = throughput_report.write_report(f"size-scale-{'-'.join(str(s) for s in cfg.sizes)}", report, args.out)
    print(f"steady rate max/min {report['ratios']['steady_max_over_min']:.3f}, peak RSS largest/smallest "
          f"{report['ratios']['peak_rss_largest_over_smallest']:.3f}; wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
