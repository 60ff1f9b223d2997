"""Flow: the whole pipeline into one RUN folder, each stage a subflow reading only the previous stage's folder.

    SRC -> RUN/shards -> RUN/detector/detector.pt -> RUN/scores -> RUN/neighbours -> RUN/clean + RUN/report.html
        -> RUN/sanitize.json

The detector is trained on AUX when given, else on the corpus shards themselves; a given --detector skips
training. Every stage resumes or skips from its own markers, so rerunning the same sanitize into the same RUN
does no new work and leaves the outputs as they are (RUN/sanitize.json included: see dede_core.stages.record).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from dede_core.stages import record as run_manifest
from dede_core.stages.clean import CleanSettings
from dede_core.stages.score import ScoreSettings
from dede_core.stages.neighbours import NeighboursSettings
from flows.clean import clean_flow
from flows.neighbours import neighbours_flow
from flows.runners import Engine
from flows.score import score_flow
from flows.shard import ShardSettings, shard_flow
from flows.train import TrainSettings, train_flow
from schemas.manifest import differences
from schemas.names import RUN_RECORD

ARTIFACT_KEY = "dede-sanitize"


def run_paths(out: str, detector: str | None = None) -> dict[str, str]:
    """Where each stage writes inside RUN (a given detector stays where it is)."""
    run = os.path.abspath(out)
    return {"shards": os.path.join(run, "shards"),
            "detector": os.path.abspath(detector) if detector else os.path.join(run, "detector", "detector.pt"),
            "scores": os.path.join(run, "scores"), "neighbours": os.path.join(run, "neighbours"),
            "clean": os.path.join(run, "clean"),
            "rejected": os.path.join(run, "clean", "rejected.parquet"), "report": os.path.join(run, "report.html"),
            "manifest": os.path.join(run, RUN_RECORD)}


TRAINING = ("encoder", "aux", "preset", "detector_overrides", "epochs", "train_batch_size", "train_seed")


def _trained_before(paths: dict[str, str], config: dict[str, Any]) -> bool:
    """True when an earlier sanitize into RUN finished training on the corpus with these settings: a rerun over
    a grown corpus keeps that detector (retraining on more shards would change every score and the threshold).
    Other training settings are refused, naming what differs."""
    if not os.path.isfile(paths["manifest"]) or not os.path.isfile(paths["detector"]):
        return False
    old = run_manifest.read(paths["manifest"])["config"]
    diffs = differences({k: old.get(k) for k in TRAINING}, {k: config.get(k) for k in TRAINING})
    if diffs:
        raise ValueError(f"{paths['detector']} was trained by an earlier run with other settings "
                         f"({'; '.join(diffs)}); sanitize into a new RUN folder")
    return True


@task(name="record-run", cache_policy=NONE)
def record_task(config: dict[str, Any], paths: dict[str, str], timings: dict[str, float],
                work: dict[str, Any]) -> dict:
    """Collect RUN/sanitize.json from the stage folders and write it (left alone when only timings differ)."""
    outputs = {k: v for k, v in paths.items() if k != "manifest"}
    record = run_manifest.collect(config=config, paths=outputs, timings=timings, work=work)
    changed = run_manifest.write(paths["manifest"], record)
    get_run_logger().info(f"{'wrote' if changed else 'unchanged:'} {paths['manifest']}")
    return record


@dataclass(frozen=True)
class SanitizeConfig:
    """Every setting of a sanitize run but its corpus, encoder and RUN folder, one object per stage."""

    detector: str | None = None  # a trained checkpoint to use: nothing is trained
    aux: str | None = None  # clean images to train the detector on (default: the corpus itself)
    training: TrainSettings = field(default_factory=TrainSettings)  # trains on score.device, score.workers
    shard: ShardSettings = field(default_factory=ShardSettings)
    score: ScoreSettings = field(default_factory=ScoreSettings)
    neighbours: NeighboursSettings = field(default_factory=NeighboursSettings)  # the corpus-level neighbourhoods
    clean: CleanSettings = field(default_factory=CleanSettings)
    engine: Engine = field(default_factory=Engine)  # where score and clean run their jobs
    thumbnails: int = 24  # sample images in RUN/report.html


def record_config(src: str, encoder: str, out: str, config: SanitizeConfig) -> dict[str, Any]:
    """The settings as RUN/sanitize.json records them: flat, as runs recorded before there were config objects,
    so that a rerun into an older RUN compares its training settings (_trained_before) and rewrites nothing."""
    train, score, engine = config.training.train, config.score, config.engine
    return {"src": src, "encoder": encoder, "out": out, "detector": config.detector, "aux": config.aux,
            "preset": config.training.preset, "detector_overrides": dict(config.training.overrides) or None,
            "epochs": train.epochs, "max_epochs": train.max_epochs, "patience": train.patience,
            "train_batch_size": train.batch_size, "train_seed": train.seed,
            "samples_per_shard": config.shard.samples_per_shard, "rule": config.clean.rule.to_dict(),
            "keep_unscored": config.clean.keep_unscored, "seed": score.score.seed, "draws": score.score.draws,
            "visible": score.score.visible, "chunk": score.score.chunk, "knn_k": score.knn_k,
            "with_embedding": score.with_embedding, "batch_size": score.batch_size, "device": score.device,
            "workers": score.workers, "group_size": score.group_size, "max_parallel": engine.max_parallel,
            "runner": engine.runner, "dask_workers": engine.dask_workers,
            "follow_external_links": config.shard.follow_external_links, "image_column": config.shard.image_column,
            "key_column": config.shard.key_column, "label_column": config.shard.label_column,
            "copy_samples": config.clean.copy, "thumbnails": config.thumbnails, "decisions": config.clean.decisions}


@flow(name="dede-sanitize")
def sanitize_flow(src: str, encoder: str, out: str, config: SanitizeConfig = SanitizeConfig()) -> dict:
    """Shard SRC, train a detector for ENCODER (unless config.detector is given), score, clean with
    config.clean.rule (default fpr 0.05) and report, all under OUT. config.engine: where the score and clean
    stages run their jobs (local, dask, dask://HOST:PORT; flows/runners.py).

    Returns {run, paths, counts, work, threshold, how}; RUN/sanitize.json holds the full record.
    """
    record_settings = record_config(src, encoder, out, config)
    paths = run_paths(out, config.detector)
    timer, work = run_manifest.StageTimer(), {}

    with timer.stage("shard"):
        shards = shard_flow(src, paths["shards"], config.shard)
    work["shard"] = {"samples": shards["samples"], "shards": len(shards["shards"]), **shards["changes"]}
    trained = config.detector is None and config.aux is None and _trained_before(paths, record_settings)
    if trained:  # the corpus may have grown since: scores stay comparable only from the first run's detector
        get_run_logger().info(f"reusing {paths['detector']}, trained on the corpus by the first run")
    elif config.detector is None:
        with timer.stage("train"):
            train_flow(config.aux or paths["shards"], encoder, os.path.dirname(paths["detector"]), config.training,
                       device=config.score.device, workers=config.score.workers)
    work["train"] = ({"given": paths["detector"]} if config.detector else {"reused": paths["detector"]} if trained
                     else {"trained_on": config.aux or paths["shards"]})
    with timer.stage("score"):
        score = dataclasses.replace(config.score, encoder=encoder)  # the victim named here, never the checkpoint's
        scored = score_flow(paths["shards"], paths["detector"], paths["scores"], score, config.engine)
    work["score"] = {"scored": len(scored["scored"]), "already_done": len(scored["skipped"])}
    with timer.stage("neighbours"):
        near = neighbours_flow(paths["scores"], paths["neighbours"], config.neighbours, config.engine)
    work["neighbours"] = {"recomputed": near["recomputed"], "groups": near["groups"]}
    clean_settings = dataclasses.replace(config.clean, neighbours=paths["neighbours"])
    with timer.stage("clean"):
        cleaned = clean_flow(paths["shards"], paths["scores"], paths["clean"], clean_settings, config.engine,
                             report_path=paths["report"], thumbnails=config.thumbnails)
    work["clean"] = {"written": len(cleaned["written"]), "already_done": len(cleaned["skipped"])}

    record = record_task(record_settings, paths, timer.seconds, work)
    get_run_logger().info(run_manifest.work_text(work))
    create_markdown_artifact(markdown=run_manifest.markdown(record, work), key=ARTIFACT_KEY,
                             description=f"dede sanitize of {src} into {paths['manifest']}")
    return {"run": os.path.abspath(out), "paths": paths, "counts": record["counts"], "work": work,
            "threshold": record["selection"]["threshold"], "how": record["selection"]["how"]}
