"""The generalization suite (`dede bench detection --suite generalization`): backdoors nobody tuned dede for,
each detected with dede's defaults only (detector size from the data, training until convergence, default score).

Victims are EfficientNet-Lite0 with its real ImageNet weights at its own input size (64 or 96 px), fine-tuned
BadEncoder-style. Triggers: a sticker cut from a real photo pasted at a random position, and a blended photo.
Data: crops of scikit-image's photos (12 classes, one per photo; auxiliary and shadow crops from the left 62% of
each photo, evaluation crops from the rest) and Fashion-MNIST at its native 28 px. Every artifact is cached by
config hash under the cache folder, so a rerun computes only what changed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bench import metrics
from bench.attacks import apply_trigger
from bench.attacks.badencoder import BackdoorConfig, backdoor_encoder, cached_backdoor
from bench.detection import (ArraySource, cached_result, config_digest, plot_curves, rows_markdown,
                                       score_images, table_row)
from dede_core.detector.checkpoint import load_checkpoint
from dede_core.detector.config import DetectorConfig
from bench.datasets import load_fashion_mnist
from dede_core.detector.encoders import load_encoder
from dede_core.detector.health import RELIANCE_FLOOR
from dede_core.detector.knn import density_score
from dede_core.detector.scorer import ScoreConfig
from bench.ssl import knn_accuracy, linear_probe
from dede_core.detector.train import TrainConfig, detector_config, train_detector

PHOTO_CLASSES = ("coffee", "rocket", "chelsea", "retina", "hubble_deep_field", "immunohistochemistry", "brick",
                 "grass", "gravel", "camera", "moon", "coins")
RESULT_VERSION = 3  # raise when what a case computes changes beyond the configs in its result id
TRAIN_WIDTH = 0.62  # crops for training (aux, shadow, probe) come from this left part of each photo


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def photo_crops(side: int, count: int, *, split: str, seed: int) -> tuple[Tensor, Tensor]:
    """`count` RGB crops (N, 3, side, side) of the PHOTO_CLASSES photos and their class; split 'train' takes the
    left TRAIN_WIDTH of each photo, 'test' the rest, so the two never share pixels."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    images, labels = [], []
    for i in range(count):
        label = i % len(PHOTO_CLASSES)
        photo = _photo(PHOTO_CLASSES[label])
        w, h = photo.size
        lo, hi = (0, int(TRAIN_WIDTH * w)) if split == "train" else (int(TRAIN_WIDTH * w), w)
        crop = int(min(rng.uniform(0.2, 0.45) * min(w, h), hi - lo - 1, h - 1))
        left, top = int(rng.integers(lo, hi - crop)), int(rng.integers(0, h - crop))
        patch = photo.resize((side, side), Image.BILINEAR, box=(left, top, left + crop, top + crop))
        images.append(torch.from_numpy(np.asarray(patch, dtype=np.uint8).copy()).permute(2, 0, 1))
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def fashion(split: str, start: int, count: int) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST at its native 28 x 28 grayscale, images [start, start + count) of the split."""
    images, labels = load_fashion_mnist(split)
    return (torch.from_numpy(images[start:start + count].copy())[:, None],
            torch.from_numpy(labels[start:start + count].astype(np.int64)))


@dataclass(frozen=True)
class Victim:
    """A packaged pretrained encoder at its own input size, backdoored on shadow images of `dataset`."""

    encoder: str
    dataset: str  # "photos" (crops at the encoder's size) or "fashion" (28 px, which the encoder upsamples)
    trigger: str
    trigger_args: dict
    backdoor: BackdoorConfig


def _tune(trigger: str, **changes: Any) -> BackdoorConfig:
    settings = dict(trigger=trigger, target=0, references=10, shadow_images=1000, epochs=5, batch_size=64, lr=3e-4)
    return BackdoorConfig(**{**settings, **changes})


VICTIMS = {
    "effnet64-sticker-photos": Victim("efficientnet-lite0?size=64", "photos", "sticker", {"fraction": 0.2},
                                      _tune("sticker")),
    # At 28 px a 0.2 sticker (6 px) planted in 5 epochs on 1,000 images reached ASR 0.47: larger and longer.
    "effnet64-sticker-fashion": Victim("efficientnet-lite0?size=64", "fashion", "sticker", {"fraction": 0.25},
                                       _tune("sticker", shadow_images=2000, epochs=8)),
    "effnet96-blend-photos": Victim("efficientnet-lite0?size=96", "photos", "blend", {"alpha": 0.2},
                                    _tune("blend", shadow_images=800, epochs=4)),
}


@dataclass(frozen=True)
class Case:
    """One held-out situation: a victim, where the auxiliary images come from and how many carry the trigger."""

    victim: str
    aux: str = "in"  # "in": the victim's dataset; "ood": the other dataset, at the corpus' side
    aux_poison: float = 0.01
    ablation: bool = False  # also train the no-embedding ablation (the health check must fail it)


CASES = {
    "sticker64-photos": Case("effnet64-sticker-photos", ablation=True),
    "sticker64-photos-aux0.5%": Case("effnet64-sticker-photos", aux_poison=0.005),
    "sticker64-photos-aux5%": Case("effnet64-sticker-photos", aux_poison=0.05),
    "sticker64-photos-ood-aux": Case("effnet64-sticker-photos", aux="ood"),
    "sticker64-fashion": Case("effnet64-sticker-fashion"),
    "blend96-photos": Case("effnet96-blend-photos"),
}


@dataclass(frozen=True)
class SuiteConfig:
    cases: tuple[str, ...] = tuple(CASES)
    aux_images: int = 3000
    eval_images: int = 720  # clean evaluation images before the target class is removed
    probe_images: int = 1200  # labelled clean images for the victim's kNN and linear-probe accuracy
    min_asr: float = 0.8
    seed: int = 0
    backdoor: dict = dataclasses.field(default_factory=dict)  # BackdoorConfig overrides for every victim (tiny)
    train: dict = dataclasses.field(default_factory=dict)  # TrainConfig overrides: empty (dede's defaults) but tiny


def tiny_suite() -> SuiteConfig:
    """Minutes on 2 cores: only checks the machinery (a one-epoch backdoor, a few hundred images)."""
    return SuiteConfig(cases=("sticker64-photos",), aux_images=240, eval_images=48, probe_images=96, min_asr=0.0,
                       backdoor={"shadow_images": 64, "epochs": 1}, train={"epochs": 2})


def _side(victim: Victim) -> int:
    return load_encoder(victim.encoder).input_size


def _data(victim: Victim, split: str, count: int, seed: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    if victim.dataset == "photos":
        return photo_crops(_side(victim), count, split=split, seed=seed + offset)
    start = {"train": 30_000, "test": 0}[split] + offset  # SimCLR victims of bench_detection train on 0-30k
    return fashion(split, start, count)


def _trigger(victim: Victim, images: Tensor, seed: int) -> Tensor:
    args = dict(victim.trigger_args)
    if victim.trigger == "sticker":
        args["seed"] = seed
    return apply_trigger(victim.trigger, images, **args)


def build_victim(name: str, suite: SuiteConfig, cache: Path, log: Callable[[str], None]) -> str:
    """The backdoored encoder's spec (weights cached by config hash)."""
    victim = VICTIMS[name]
    clean = load_encoder(victim.encoder)
    cfg = dataclasses.replace(victim.backdoor, **suite.backdoor)
    shadow, _ = _data(victim, "train", cfg.shadow_images, seed=11)
    pool, labels = _data(victim, "train", 12 * cfg.references, seed=12, offset=5000)
    refs = pool[labels == cfg.target][:cfg.references]
    steps = itertools.count()

    def trigger(images: Tensor) -> Tensor:  # a new sticker position for every image at every step
        return _trigger(victim, images, seed=1000 + next(steps))

    def build() -> torch.nn.Module:
        log(f"{name}: backdooring {victim.encoder} ({victim.trigger} trigger)")
        return backdoor_encoder(clean.model, normalize=clean.prepare, shadow_u8=shadow, reference_u8=refs,
                                trigger=trigger, config=cfg, log=log)

    tag = json.dumps([victim.trigger_args, victim.dataset], sort_keys=True)
    path = cached_backdoor(cache, clean.fingerprint + tag, cfg, build)
    return f"{victim.encoder}&weights={path}"


@torch.no_grad()
def evaluate_victim(name: str, spec: str, suite: SuiteConfig) -> dict[str, float]:
    """kNN and linear-probe accuracy on clean held-out images, and the attack success rate on triggered ones."""
    victim, encoder = VICTIMS[name], load_encoder(spec)
    classes = len(PHOTO_CLASSES) if victim.dataset == "photos" else 10
    train_x, train_y = _data(victim, "train", suite.probe_images, seed=21, offset=10_000)
    test_x, test_y = _data(victim, "test", suite.eval_images, seed=22)
    embed = functools.partial(_embed_all, encoder)
    train_emb, test_emb = embed(train_x), embed(test_x)
    with torch.enable_grad():
        probe = linear_probe(train_emb, train_y, classes=classes)
    others = test_y != victim.backdoor.target
    triggered = embed(_trigger(victim, test_x[others], seed=77))
    return {"knn_accuracy": knn_accuracy(train_emb, train_y, test_emb, test_y, classes=classes),
            "clean_accuracy": (probe(test_emb).argmax(1) == test_y).float().mean().item(),
            "attack_success_rate": (probe(triggered).argmax(1) == victim.backdoor.target).float().mean().item()}


def _embed_all(encoder, images: Tensor) -> Tensor:
    return torch.cat([encoder(images[i:i + 256].float() / 255) for i in range(0, len(images), 256)])


def _aux(case: Case, suite: SuiteConfig) -> Tensor:
    """Auxiliary images: in-distribution (train split) or the other dataset, `aux_poison` of them triggered."""
    victim = VICTIMS[case.victim]
    if case.aux == "in":
        aux, _ = _data(victim, "train", suite.aux_images, seed=31, offset=20_000)
    elif victim.dataset == "photos":  # Fashion-MNIST, brought to the corpus' side and to RGB
        gray, _ = fashion("train", 50_000, suite.aux_images)
        side = _side(victim)
        aux = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(g[0].numpy()).resize(
            (side, side), Image.BILINEAR).convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1) for g in gray])
    else:
        aux, _ = photo_crops(64, suite.aux_images, split="train", seed=31)
    aux = aux.clone()
    count = int(round(case.aux_poison * len(aux)))
    chosen = torch.randperm(len(aux), generator=torch.Generator().manual_seed(suite.seed + 1))[:count]
    if count and case.aux == "in":  # OOD auxiliary data is nobody's poisoned copy of the corpus
        aux[chosen] = _trigger(victim, aux[chosen], seed=41)
    return aux


def _detector(cache: Path, name: str, aux: Tensor, spec: str, suite: SuiteConfig, log: Callable[[str], None],
              ablation: bool = False) -> tuple[Path, DetectorConfig, TrainConfig, str]:
    """Train (or reuse) a detector with dede's defaults: size from the data, training until convergence."""
    source = ArraySource(aux, name)
    config, note = detector_config("cpu", {"use_global": False} if ablation else {}, source)
    train = TrainConfig(**suite.train)
    content = f"array:{name}:{_sha(aux)}"
    out = cache / f"detector-{name}-{config_digest(spec, config.to_dict(), dataclasses.asdict(train), content)}"
    log(f"{name}: {note}")
    path = train_detector(source=source, data_id=content, encoder=load_encoder(spec), config=config, train=train,
                          out_dir=out, log=log)
    return path, config, train, note


def _robust_z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    median = np.median(reference)
    return (values - median) / max(float(np.median(np.abs(reference - median))), 1e-12)


def _sha(images: Tensor) -> str:
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]


def _detector_rows(path: Path, eval_images: Tensor, n_neg: int, label: str, cache: Path
                   ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    s = score_images(path, eval_images, cache=cache)
    rows = {f"{label} score (default)": table_row(s["score"][:n_neg], s["score"][n_neg:], s["calib_score"]),
            f"{label} recon_error (raw DeDe)": table_row(s["recon_error"][:n_neg], s["recon_error"][n_neg:],
                                                         s["calib_recon_error"])}
    return rows, s


def run_case(name: str, suite: SuiteConfig, cache: Path, log: Callable[[str], None]) -> dict[str, Any]:
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
    test_x, test_y = _data(victim, "test", suite.eval_images, seed=51)
    clean = test_x[test_y != victim.backdoor.target]
    eval_images = torch.cat([clean, _trigger(victim, clean, seed=52)])
    n_neg = len(clean)
    aux = _aux(case, suite)
    path, config, train, note = _detector(cache, f"gen-{name}", aux, spec, suite, log)
    ckpt = load_checkpoint(path)
    rows, s = _detector_rows(path, eval_images, n_neg, "dede", cache)
    knn = s["knn_score"]
    rows["knn_score (shipped column)"] = table_row(knn[:n_neg], knn[n_neg:], s["calib_knn_score"])
    density = density_score(torch.from_numpy(knn), torch.from_numpy(s["calib_knn_score"])).double().numpy()
    calib_density = density_score(torch.from_numpy(s["calib_knn_score"]),
                                  torch.from_numpy(s["calib_knn_score"])).double().numpy()
    rows["density (two-sided, on knn_score)"] = table_row(density[:n_neg], density[n_neg:], calib_density)
    rows["-knn_score (collapse, one-sided)"] = table_row(-knn[:n_neg], -knn[n_neg:], -s["calib_knn_score"])
    fused = metrics.rank_average(s["score"], density)
    rows["dede score + density (rank average)"] = table_row(fused[:n_neg], fused[n_neg:], None)
    # Each score as robust z against the held-out images, then the larger: flagged when either is extreme.
    z_score = _robust_z(np.log(s["score"]), np.log(s["calib_score"]))
    fused = np.maximum(z_score, density)
    calib_fused = np.maximum(_robust_z(np.log(s["calib_score"]), np.log(s["calib_score"])), calib_density)
    rows["max(dede z, density) (calibrated fusion)"] = table_row(fused[:n_neg], fused[n_neg:], calib_fused)
    result.update(detector={"size": config.img_size, "patch": config.patch_size, "note": note,
                            "epochs": ckpt.meta.get("epoch"), "stopped": ckpt.meta.get("stopped"),
                            "health": ckpt.meta.get("health")},
                  rows=rows, eval_negatives=n_neg, eval_positives=n_neg,
                  curves={k: (v[:n_neg].tolist(), v[n_neg:].tolist()) for k, v in
                          {"dede score": s["score"], "dede recon_error": s["recon_error"],
                           "density": density}.items()})
    if case.ablation:
        abl_path, _, _, _ = _detector(cache, f"gen-{name}", aux, spec, suite, log, ablation=True)
        abl_rows, _ = _detector_rows(abl_path, eval_images, n_neg, "no-embedding ablation", cache)
        rows.update(abl_rows)
        result["ablation_health"] = load_checkpoint(abl_path).meta.get("health")
    return result


def run_suite(suite: SuiteConfig, cache_dir: str | Path, out_dir: str | Path, *, name: str = "generalization",
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every case (cached steps reused); OUT/<name>.md, .json and ROC PNGs are rewritten after each case."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    cache, out = Path(cache_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"config": dataclasses.asdict(suite), "results": [],
                              "machine": f"{platform.processor() or platform.machine()}, "
                                         f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d")}
    for case in suite.cases:
        stored = cache / "results" / f"gen-{case}-{_result_id(suite, case)}.json"
        result = cached_result(stored, lambda: run_case(case, suite, cache, log), log)
        plot_curves(result, out / f"{name}-roc-{case}.png", case)
        report["results"].append(result)
        report["wall_s"] = time.perf_counter() - started
        report["finished"] = len(report["results"]) == len(suite.cases)
        (out / f"{name}.json").write_text(json.dumps(report, indent=1))
        (out / f"{name}.md").write_text(render_markdown(report, name))
    return report


def _result_id(suite: SuiteConfig, case: str) -> str:
    """Names a case's finished result: the suite, the case, its victim and dede's defaults (train and score)."""
    victim = VICTIMS[CASES[case].victim]
    settings = {k: v for k, v in dataclasses.asdict(suite).items() if k != "cases"}  # not which others run
    return config_digest(RESULT_VERSION, settings, dataclasses.asdict(CASES[case]),
                   dataclasses.asdict(victim), dataclasses.asdict(TrainConfig()), dataclasses.asdict(ScoreConfig()))


def render_markdown(report: dict[str, Any], name: str) -> str:
    done = len(report["results"])
    partial = "" if report["finished"] else f" Partial: {done} of {len(report['config']['cases'])} cases done."
    lines = [f"# Generalization suite ({name})", "",
             f"Date {report['date']}; machine: {report['machine']}; this run's wall time "
             f"{report['wall_s'] / 60:.1f} min (cached steps reused; 'wall' is what a case took when it was computed)."
             + partial, "",
             "Every detector uses dede's defaults: `cpu` preset, size and patch from the auxiliary images, training "
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
    lines += ["", "## Every score (AUROC; TPR at 1% / 5% FPR; FPR and TPR at the label-free 5% threshold)", ""]
    for r in report["results"]:
        if not r.get("rows"):
            continue
        lines += [f"### {r['case']} ({r['eval_negatives']} clean + {r['eval_positives']} triggered)", "",
                  f"Detector: {r['detector']['note']}; stopped: {r['detector']['stopped']}.", ""]
        if r.get("ablation_health"):
            lines += [f"No-embedding ablation health: embedding reliance "
                      f"{r['ablation_health']['embedding_reliance']:.3f} (passed: {r['ablation_health']['passed']}).",
                      ""]
        lines += rows_markdown(r["rows"], "score")
    return "\n".join(lines) + "\n"
