"""The generalization suite (`dede bench detection --suite generalization`): backdoors nobody tuned dede for,
each detected with dede's defaults only (detector size from the data, training until convergence, default score).

Victims are EfficientNet-Lite0 with its real ImageNet weights at its own input size (64 or 96 px), fine-tuned
BadEncoder-style. Triggers: a sticker cut from a real photo pasted at a random position, and a blended photo.
Data: crops of scikit-image's photos (12 classes, one per photo; auxiliary and shadow crops from the left 62% of
each photo, evaluation crops from the rest) and Fashion-MNIST at its native 28 px (bench.cases). Every artifact
is cached by config hash under the cache folder, so a rerun computes only what changed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench import metrics
from bench.attacks.badencoder import backdoor_encoder, cached_backdoor
from bench.cases import CASES, PHOTO_CLASSES, VICTIMS, SuiteConfig, aux_images, data, trigger
from bench.common import ArraySource, config_digest, fit_detector, score_images, table_row
from bench.report import Log, report_header, run_report, score_sections, stderr_log
from bench.ssl import embed_all, knn_accuracy, linear_probe
from dede_core.detector.checkpoint import load_checkpoint
from dede_core.detector.config import DetectorConfig
from dede_core.detector.encoders import load_encoder
from dede_core.detector.health import RELIANCE_FLOOR
from dede_core.detector.knn import density_score
from dede_core.detector.scorer import ScoreConfig
from dede_core.detector.aux import detector_config
from dede_core.detector.train import TrainConfig

RESULT_VERSION = 3  # raise when what a case computes changes beyond the configs in its result id


def build_victim(name: str, suite: SuiteConfig, cache: Path, log: Log) -> str:
    """The backdoored encoder's spec (weights cached by config hash)."""
    victim = VICTIMS[name]
    clean = load_encoder(victim.encoder)
    cfg = dataclasses.replace(victim.backdoor, **suite.backdoor)
    shadow, _ = data(victim, "train", cfg.shadow_images, seed=11)
    pool, labels = data(victim, "train", 12 * cfg.references, seed=12, offset=5000)
    refs = pool[labels == cfg.target][:cfg.references]
    steps = itertools.count()

    def plant(images: Tensor) -> Tensor:  # a new sticker position for every image at every step
        return trigger(victim, images, seed=1000 + next(steps))

    def build() -> torch.nn.Module:
        log(f"{name}: backdooring {victim.encoder} ({victim.trigger} trigger)")
        return backdoor_encoder(clean.model, normalize=clean.prepare, shadow_u8=shadow, reference_u8=refs,
                                trigger=plant, config=cfg, log=log)

    tag = json.dumps([victim.trigger_args, victim.dataset], sort_keys=True)
    path = cached_backdoor(cache, clean.fingerprint + tag, cfg, build)
    return f"{victim.encoder}&weights={path}"


@torch.no_grad()
def evaluate_victim(name: str, spec: str, suite: SuiteConfig) -> dict[str, float]:
    """kNN and linear-probe accuracy on clean held-out images, and the attack success rate on triggered ones."""
    victim, encoder = VICTIMS[name], load_encoder(spec)
    classes = len(PHOTO_CLASSES) if victim.dataset == "photos" else 10
    train_x, train_y = data(victim, "train", suite.probe_images, seed=21, offset=10_000)
    test_x, test_y = data(victim, "test", suite.eval_images, seed=22)
    embed = functools.partial(embed_all, encoder, batch=256)
    train_emb, test_emb = embed(train_x), embed(test_x)
    with torch.enable_grad():
        probe = linear_probe(train_emb, train_y, classes=classes)
    others = test_y != victim.backdoor.target
    triggered = embed(trigger(victim, test_x[others], seed=77))
    return {"knn_accuracy": knn_accuracy(train_emb, train_y, test_emb, test_y, classes=classes),
            "clean_accuracy": (probe(test_emb).argmax(1) == test_y).float().mean().item(),
            "attack_success_rate": (probe(triggered).argmax(1) == victim.backdoor.target).float().mean().item()}


def _detector(cache: Path, name: str, aux: Tensor, spec: str, suite: SuiteConfig, log: Log,
              ablation: bool = False) -> tuple[Path, DetectorConfig, str]:
    """Train (or reuse) a detector with dede's defaults: size from the data, training until convergence."""
    config, note = detector_config("cpu", {"use_global": False} if ablation else {}, ArraySource(aux, name))
    log(f"{name}: {note}")
    return fit_detector(cache, name, aux, spec, config, TrainConfig(**suite.train), log), config, note


def _robust_z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    median = np.median(reference)
    return (values - median) / max(float(np.median(np.abs(reference - median))), 1e-12)


def _detector_rows(path: Path, eval_images: Tensor, n_neg: int, label: str, cache: Path
                   ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    s = score_images(path, eval_images, cache=cache)
    rows = {f"{label} score (default)": table_row(s["score"][:n_neg], s["score"][n_neg:], s["calib_score"]),
            f"{label} recon_error (raw DeDe)": table_row(s["recon_error"][:n_neg], s["recon_error"][n_neg:],
                                                         s["calib_recon_error"])}
    return rows, s


def _knn_rows(s: dict[str, np.ndarray], n_neg: int) -> tuple[dict[str, dict], np.ndarray]:
    """Rows of the shipped knn_score, the density score on it, and their fusions with the dede score; and the
    density scores, for the ROC plot."""
    knn, calib_knn = s["knn_score"], s["calib_knn_score"]
    rows = {"knn_score (shipped column)": table_row(knn[:n_neg], knn[n_neg:], calib_knn)}
    density = density_score(torch.from_numpy(knn), torch.from_numpy(calib_knn)).double().numpy()
    calib_density = density_score(torch.from_numpy(calib_knn), torch.from_numpy(calib_knn)).double().numpy()
    rows["density (two-sided, on knn_score)"] = table_row(density[:n_neg], density[n_neg:], calib_density)
    rows["-knn_score (collapse, one-sided)"] = table_row(-knn[:n_neg], -knn[n_neg:], -calib_knn)
    fused = metrics.rank_average(s["score"], density)
    rows["dede score + density (rank average)"] = table_row(fused[:n_neg], fused[n_neg:], None)
    # Each score as robust z against the held-out images, then the larger: flagged when either is extreme.
    z_score = _robust_z(np.log(s["score"]), np.log(s["calib_score"]))
    fused = np.maximum(z_score, density)
    calib_fused = np.maximum(_robust_z(np.log(s["calib_score"]), np.log(s["calib_score"])), calib_density)
    rows["max(dede z, density) (calibrated fusion)"] = table_row(fused[:n_neg], fused[n_neg:], calib_fused)
    return rows, density


def run_case(name: str, suite: SuiteConfig, cache: Path, log: Log) -> dict[str, Any]:
    """Victim, its evaluation, the default detector (and the ablation where asked), every score row."""
    case = CASES[name]
    victim = VICTIMS[case.victim]
    spec = build_victim(case.victim, suite, cache, log)
    result: dict[str, Any] = {"case": name, "victim": case.victim, "encoder": victim.encoder,
                              "dataset": victim.dataset, "trigger": victim.trigger, "trigger_args": victim.trigger_args,
                              "aux": case.aux, "aux_poison": case.aux_poison,
                              "victim_metrics": evaluate_victim(case.victim, spec, suite)}
    result["works"] = result["victim_metrics"]["attack_success_rate"] >= suite.min_asr
    if not result["works"]:
        log(f"{name}: ASR {result['victim_metrics']['attack_success_rate']:.2f} below {suite.min_asr}: not used")
        return result
    test_x, test_y = data(victim, "test", suite.eval_images, seed=51)
    clean = test_x[test_y != victim.backdoor.target]
    eval_images = torch.cat([clean, trigger(victim, clean, seed=52)])
    n_neg = len(clean)
    aux = aux_images(case, suite)
    path, config, note = _detector(cache, f"gen-{name}", aux, spec, suite, log)
    ckpt = load_checkpoint(path)
    rows, s = _detector_rows(path, eval_images, n_neg, "dede", cache)
    knn_rows, density = _knn_rows(s, n_neg)
    rows.update(knn_rows)
    result.update(detector={"size": config.img_size, "patch": config.patch_size, "note": note,
                            "epochs": ckpt.meta.get("epoch"), "stopped": ckpt.meta.get("stopped"),
                            "health": ckpt.meta.get("health")},
                  rows=rows, eval_negatives=n_neg, eval_positives=n_neg,
                  curves={k: (v[:n_neg].tolist(), v[n_neg:].tolist()) for k, v in
                          {"dede score": s["score"], "dede recon_error": s["recon_error"],
                           "density": density}.items()})
    if case.ablation:
        abl_path, _, _ = _detector(cache, f"gen-{name}", aux, spec, suite, log, ablation=True)
        abl_rows, _ = _detector_rows(abl_path, eval_images, n_neg, "no-embedding ablation", cache)
        rows.update(abl_rows)
        result["ablation_health"] = load_checkpoint(abl_path).meta.get("health")
    return result


def run_suite(suite: SuiteConfig, cache_dir: str | Path, out_dir: str | Path, *, name: str = "generalization",
              log: Log | None = None) -> dict[str, Any]:
    """Run every case (cached steps reused); OUT/<name>.md, .json and ROC PNGs are rewritten after each case."""
    log = log or stderr_log
    cache = Path(cache_dir)
    return run_report(suite.cases, config=dataclasses.asdict(suite), out_dir=out_dir, name=name,
                      stored=lambda case: cache / "results" / f"gen-{case}-{_result_id(suite, case)}.json",
                      compute=lambda case: run_case(case, suite, cache, log), title=lambda case, result: case,
                      render=render_markdown, log=log)


def _result_id(suite: SuiteConfig, case: str) -> str:
    """Names a case's finished result: the suite, the case, its victim and dede's defaults (train and score)."""
    victim = VICTIMS[CASES[case].victim]
    settings = {k: v for k, v in dataclasses.asdict(suite).items() if k != "cases"}  # not which others run
    return config_digest(RESULT_VERSION, settings, dataclasses.asdict(CASES[case]),
                   dataclasses.asdict(victim), dataclasses.asdict(TrainConfig()), dataclasses.asdict(ScoreConfig()))


def render_markdown(report: dict[str, Any], name: str) -> str:
    """The Markdown report of a suite run: a line per case, then every score row of each."""
    lines = report_header(report, f"Generalization suite ({name})", "cases",
                          "cached steps reused; 'wall' is what a case took when it was computed")
    lines += ["Every detector uses dede's defaults: `cpu` preset, size and patch from the auxiliary images, training "
             "until the held-out embedding reliance stops improving, the default score (reconstruction error over "
             "the 10th percentile of 64 reference reconstructions' errors). Health: embedding reliance (floor "
             f"{RELIANCE_FLOOR}).", "",
             "| case | victim | data | trigger | aux | kNN acc | probe acc | ASR | detector | epochs | health | "
             "AUROC | TPR@5% | label-free FPR / TPR | wall (min) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        v = r["victim_metrics"]
        head = (f"| {r['case']} | {r['encoder']} | {r['dataset']} | {r['trigger']} | {r['aux']} "
                f"{r['aux_poison']:.1%} | {v['knn_accuracy']:.3f} | {v['clean_accuracy']:.3f} | "
                f"{v['attack_success_rate']:.3f} |")
        if not r["works"]:
            lines.append(head + " not used (ASR below threshold) | | | | | | |")
            continue
        d, row = r["detector"], r["rows"]["dede score (default)"]
        health = d["health"] or {}
        lines.append(head + f" {d['size']} px / {d['patch']} | {d['epochs']} | "
                     f"{health.get('embedding_reliance', float('nan')):.2f} | {row['auroc']:.3f} | "
                     f"{row['tpr_at_5']:.3f} | {row['label_free_fpr']:.3f} / {row['label_free_tpr']:.3f} | "
                     f"{r['wall_s'] / 60:.1f} |")
    lines += score_sections(report, "Every score", "case", "score", notes=_case_notes)
    return "\n".join(lines) + "\n"


def _case_notes(r: dict[str, Any]) -> list[str]:
    """How the case's detector was sized and stopped, and the ablation's health where it was trained."""
    lines = [f"Detector: {r['detector']['note']}; stopped: {r['detector']['stopped']}.", ""]
    if r.get("ablation_health"):
        health = r["ablation_health"]
        lines += [f"No-embedding ablation health: embedding reliance {health['embedding_reliance']:.3f} "
                  f"(passed: {health['passed']}).", ""]
    return lines
