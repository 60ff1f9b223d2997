"""What keeping the embeddings costs the score stage (issue #20): the same corpus scored with and without
writing SCORES/embeddings/, alternately in one process (A B A B ...), the median images/s of each.

    python -m bench.embeddings_cost [--images 5000] [--rounds 3] [--work /tmp] [--out docs/results]

Corpus and detector as `dede bench throughput` makes them (32-px Fashion-MNIST PNGs, a seeded random `cpu`
detector over cifar-resnet18 width 64, D = 512); "without" replaces the embeddings write by nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import torch

from bench import throughput as bt
from dede_core.stages import scoring
from dede_core.stages.score import score_shards


def measure(images: int, rounds: int, work: str) -> dict:
    bench = bt.ThroughputConfig(images=images, samples_per_shard=500, second_precision=False)
    x, labels = bt._corpus_images(images, 32)
    shards = bt.write_corpus(work, "corpus", x, labels, bench.samples_per_shard)
    detector = bt.write_detector(work, bench)
    rates: dict[str, list[float]] = {"with embeddings": [], "without": []}
    for i in range(rounds):
        for kind in rates:
            out = Path(work) / f"scores-{kind.split()[0]}-{i}"
            keep = scoring.write_embeddings if kind == "with embeddings" else (lambda *a, **k: None)
            with mock.patch.object(scoring, "write_embeddings", keep):
                t = time.perf_counter()
                result = score_shards(shards, detector=detector, out_dir=str(out), workers=1, progress=False)
                rates[kind].append(result.samples / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"images": images, "rounds": rates, "median": med, "ratio": med["with embeddings"] / med["without"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default=None)
    p.add_argument("--out", default="docs/results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        r = measure(args.images, args.rounds, work)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# What keeping the embeddings costs the score stage", "",
             f"Command: `python -m bench.embeddings_cost --images {args.images} --rounds {args.rounds}`; {when}; "
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, one decoding "
             f"process.", "", "| run | images/s per round | median |", "| --- | --- | --- |"]
    lines += [f"| {k} | {', '.join(f'{v:.1f}' for v in vs)} | {r['median'][k]:.1f} |" for k, vs in r["rounds"].items()]
    lines += ["", f"With the embeddings the stage runs at **{r['ratio']:.3f}** of its rate without them "
              f"(target: >= 0.95).", ""]
    Path(args.out, "embeddings-cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
