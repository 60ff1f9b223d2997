"""`dede demo`: the sanitize flow end to end on real images with a backdoored encoder, no server needed.

The corpus is Fashion-MNIST (Debian's dataset-fashion-mnist) with 2% of its images carrying the BadEncoder
white-square trigger; the encoder is a SimCLR ResNet-18 trained here and backdoored with the detection
benchmark's recipe. Both are built once and cached; a rerun reuses everything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from bench.metrics import precision_recall
from dede_core.sql import connect, format_table, run_query
from bench.victims import VictimRecipe, build_victim, evaluate_victim, fashion_mnist_32, write_poisoned_corpus
from dede_core.detector.train import TrainConfig
from dede_core.stages.score import ScoreSettings
from flows.sanitize import SanitizeConfig, sanitize_flow
from flows.shard import ShardSettings
from flows.train import TrainSettings

DEMO_RECIPE = VictimRecipe()  # SimCLR width 16, 2 epochs on 10k images; BadEncoder patch trigger, target 0
DEMO_QUERY = ("SELECT key, label, round(score, 1) AS score, round(knn_score, 2) AS knn_score "
              "FROM scores ORDER BY score DESC LIMIT 5")


def _victim_metrics(weights: Path, recipe: VictimRecipe) -> dict:
    cached = weights.with_suffix(".metrics.json")
    if not cached.is_file():
        metrics = evaluate_victim(recipe.spec(weights), trigger=recipe.backdoor.trigger,
                                  target=recipe.backdoor.target)
        cached.write_text(json.dumps(metrics, indent=1))
    return json.loads(cached.read_text())


def run_demo(out: str = "runs/demo", cache: str = "cache", *, corpus_size: int = 5000, poison_rate: float = 0.02,
             epochs: int | None = None, max_epochs: int = 25, workers: int | None = None) -> dict:
    """Build (or reuse) the victim and the poisoned corpus, sanitize it, and print what came out."""
    started = time.perf_counter()
    out_dir = Path(out)
    _, bad = build_victim(DEMO_RECIPE, cache)
    victim = _victim_metrics(bad, DEMO_RECIPE)
    corpus = out_dir / "corpus"
    planted_file = Path(f"{corpus}.planted.json")
    if not planted_file.is_file():
        images, labels = fashion_mnist_32("test")
        write_poisoned_corpus(corpus, images[:corpus_size], labels[:corpus_size], rate=poison_rate,
                              trigger=DEMO_RECIPE.backdoor.trigger, target=DEMO_RECIPE.backdoor.target)
    planted = json.loads(planted_file.read_text())
    # One run folder per victim: a rebuilt encoder never meets a run folder made with another one.
    run = out_dir / f"run-{bad.stem.rsplit('-', 1)[-1]}"
    config = SanitizeConfig(training=TrainSettings(train=TrainConfig(epochs=epochs, max_epochs=max_epochs)),
                            shard=ShardSettings(samples_per_shard=1000), score=ScoreSettings(workers=workers))
    result = sanitize_flow(str(corpus), DEMO_RECIPE.spec(bad), str(run), config)
    rejected = pq.read_table(run / "clean" / "rejected.parquet").column("key").to_pylist()
    quality = precision_recall(rejected, planted)
    conn = connect(run / "scores")
    table = run_query(conn, DEMO_QUERY)
    elapsed = time.perf_counter() - started

    print("\n=== dede demo ===")
    print(f"victim encoder: {bad} (kNN acc {victim['knn_accuracy']:.3f}, probe acc {victim['clean_accuracy']:.3f},"
          f" attack success rate {victim['attack_success_rate']:.3f})")
    print(f"corpus: {corpus} ({corpus_size} Fashion-MNIST test images, {len(planted)} carrying the trigger)")
    print(f"cleaned shards: {run / 'clean'}\nscores: {run / 'scores'}\nreport: {run / 'report.html'}")
    print(f"threshold: {result.get('how', '')}")
    print(f"\n$ dede sql {run / 'scores'} \"{DEMO_QUERY}\"\n{format_table(table)}")
    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(f"\nremoved {len(rejected)} samples; against the {len(planted)} planted: precision "
          f"{rate(quality['precision'])}, recall {rate(quality['recall'])}")
    print(f"demo wall time {elapsed / 60:.1f} min")
    return {"victim": victim, "quality": quality, "removed": len(rejected), "planted": len(planted),
            "wall_s": elapsed, **result}
