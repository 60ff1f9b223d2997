"""Flow: the whole pipeline into one RUN folder, each stage a subflow reading only the previous stage's folder.

    SRC -> RUN/shards -> RUN/detector/detector.pt -> RUN/scores -> RUN/clean + RUN/report.html -> RUN/sanitize.json

The detector is trained on AUX when given, else on the corpus shards themselves; a given --detector skips
training. Every stage resumes or skips from its own markers, so rerunning the same sanitize into the same RUN
does no new work and leaves the outputs as they are (RUN/sanitize.json included: see dede_core.stages.record).
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from dede_core.stages import record as run_manifest
from dede_core.stages.select import DEFAULT_RULE, Rule
from flows.clean import clean_flow
from flows.score import score_flow
from flows.shard import shard_flow
from flows.train import train_flow
from schemas.manifest import differences
from schemas.names import RUN_RECORD

ARTIFACT_KEY = "dede-sanitize"


def run_paths(out: str, detector: str | None = None) -> dict[str, str]:
    """Where each stage writes inside RUN (a given detector stays where it is)."""
    run = os.path.abspath(out)
    return {"shards": os.path.join(run, "shards"),
            "detector": os.path.abspath(detector) if detector else os.path.join(run, "detector", "detector.pt"),
            "scores": os.path.join(run, "scores"), "clean": os.path.join(run, "clean"),
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


@flow(name="dede-sanitize")
def sanitize_flow(src: str, encoder: str, out: str, *, detector: str | None = None, aux: str | None = None,
                  preset: str = "cpu", detector_overrides: dict[str, Any] | None = None, epochs: int | None = None,
                  max_epochs: int = 100, patience: int = 8,
                  train_batch_size: int = 64, train_seed: int = 0, samples_per_shard: int = 10_000,
                  rule: dict[str, Any] | None = None, keep_unscored: bool = False, seed: int = 0, draws: int = 1,
                  visible: int | None = None, chunk: int = 64, knn_k: int = 10, with_embedding: bool = False,
                  batch_size: int = 256, device: str = "cpu", workers: int = 0, group_size: int = 1,
                  max_parallel: int = 1, runner: str = "local", dask_workers: int | None = None,
                  follow_external_links: bool = False, image_column: str | None = None,
                  key_column: str | None = None, label_column: str | None = None, copy_samples: bool = True,
                  thumbnails: int = 24) -> dict:
    """Shard SRC, train a detector for ENCODER (unless `detector` is given), score, clean with `rule`
    (Rule.to_dict(); default fpr 0.05) and report, all under OUT. device: cpu or cuda[:N]. runner: where the
    score and clean stages run their shard tasks (local, dask, dask://HOST:PORT; flows/runners.py).
    image_column, key_column, label_column: how a Parquet SRC is read. copy_samples=False: RUN/clean holds the
    verdicts only (rejected.parquet, summary.json), no cleaned shards. thumbnails: sample images in the report.

    Returns {run, paths, counts, threshold, how}; RUN/sanitize.json holds the full record.
    """
    config = {k: v for k, v in locals().items()}
    rule = rule or DEFAULT_RULE.to_dict()
    config["rule"] = Rule.from_dict(rule).to_dict()  # refuse a bad rule before hours of work
    paths = run_paths(out, detector)
    timer, work = run_manifest.StageTimer(), {}

    with timer.stage("shard"):
        shards = shard_flow(src, paths["shards"], samples_per_shard=samples_per_shard, image_column=image_column,
                            key_column=key_column, label_column=label_column,
                            follow_external_links=follow_external_links)
    work["shard"] = {"samples": shards["samples"], "shards": len(shards["shards"]), **shards["changes"]}
    trained = detector is None and aux is None and _trained_before(paths, config)
    if trained:  # the corpus may have grown since: scores stay comparable only from the first run's detector
        get_run_logger().info(f"reusing {paths['detector']}, trained on the corpus by the first run")
    elif detector is None:
        with timer.stage("train"):
            train_flow(aux or paths["shards"], encoder, os.path.dirname(paths["detector"]), preset_name=preset,
                       epochs=epochs, max_epochs=max_epochs, patience=patience, batch_size=train_batch_size,
                       seed=train_seed, device=device,
                       workers=workers, overrides=detector_overrides)
    work["train"] = ({"given": paths["detector"]} if detector else {"reused": paths["detector"]} if trained
                     else {"trained_on": aux or paths["shards"]})
    with timer.stage("score"):
        scored = score_flow(paths["shards"], paths["detector"], paths["scores"], seed=seed, draws=draws,
                            visible=visible, chunk=chunk, knn_k=knn_k, with_embedding=with_embedding,
                            batch_size=batch_size, workers=workers, device=device, group_size=group_size,
                            max_parallel=max_parallel, encoder=encoder, runner=runner, dask_workers=dask_workers)
    work["score"] = {"scored": len(scored["scored"]), "already_done": len(scored["skipped"])}
    with timer.stage("clean"):
        cleaned = clean_flow(paths["shards"], paths["scores"], paths["clean"], rule=rule,
                             keep_unscored=keep_unscored, report_path=paths["report"], runner=runner,
                             dask_workers=dask_workers, copy_samples=copy_samples, thumbnails=thumbnails)
    work["clean"] = {"written": len(cleaned["written"]), "already_done": len(cleaned["skipped"])}

    record = record_task(config, paths, timer.seconds, work)
    get_run_logger().info(run_manifest.work_text(work))
    create_markdown_artifact(markdown=run_manifest.markdown(record, work), key=ARTIFACT_KEY,
                             description=f"dede sanitize of {src} into {paths['manifest']}")
    return {"run": os.path.abspath(out), "paths": paths, "counts": record["counts"], "work": work,
            "threshold": record["selection"]["threshold"], "how": record["selection"]["how"]}
