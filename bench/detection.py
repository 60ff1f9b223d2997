"""The detection benchmark: attacks x detectors on real images, with every artifact cached by config hash.

Victim: a SimCLR ResNet-18 trained here on Fashion-MNIST, backdoored by BadEncoder-style fine-tunes with each
trigger. Detectors: DeDe with in-distribution auxiliary data carrying 1% triggered samples and with
out-of-distribution auxiliary data (MNIST digits), the no-embedding ablation, and embedding baselines.
Evaluation set: the clean Fashion-MNIST test images of the non-target classes plus the same images triggered.
The report's Markdown is bench.detection_report.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench import baselines, metrics
from bench.attacks import apply_trigger, trigger_mask
from bench.attacks.badencoder import BackdoorConfig
from bench.common import config_digest, embedder, fit_detector, score_images, table_row
from bench.datasets import load_mnist_digits
from bench.detection_report import render_markdown
from bench.downstream import DownstreamConfig, evaluate_filtering
from bench.report import Log, run_report, stderr_log
from bench.ssl import SimCLRConfig
from bench.victims import VictimRecipe, build_victim, evaluate_victim, fashion_mnist_32
from dede_core.detector.checkpoint import load_detector
from dede_core.detector.config import DetectorConfig, cpu
from dede_core.detector.knn import knn_distance
from dede_core.detector.scorer import ScoreConfig, load_scorer
from dede_core.detector.train import TrainConfig
from dede_core.io.images import fit_tensor

@dataclass(frozen=True)
class Attack:
    """A trigger, its keyword arguments, and what the fine-tune does differently from the bench's backdoor."""

    trigger: str
    args: dict = dataclasses.field(default_factory=dict)
    backdoor: dict = dataclasses.field(default_factory=dict)  # BackdoorConfig overrides
    pretrained: str | None = None  # a packaged encoder backdoored instead of the SimCLR one (VictimRecipe)


EFFNET = "efficientnet-lite0?size=64"  # ImageNet weights from its package; 32x32 images upsampled to 64 (2 cores)

# WaNet and CTRL at their reference strengths (0.5, 50) stayed below 80% ASR after a 4-epoch fine-tune (0.06,
# 0.47); these are the settings under which they work (bench/attack_probe.py measured each).
ATTACKS: dict[str, Attack] = {  # run in this order
    "badencoder": Attack("patch"),
    "drupe": Attack("patch", backdoor={"drupe": True}),
    "ctrl": Attack("ctrl", args={"magnitude": 100.0}, backdoor={"epochs": 8}),
    "effnet-badencoder": Attack("patch", backdoor={"lr": 3e-4, "epochs": 8}, pretrained=EFFNET),
    "effnet-badencoder-lr1e-4": Attack("patch", backdoor={"lr": 1e-4}, pretrained=EFFNET),  # ASR 0.75: kept as tried
    "wanet": Attack("wanet", args={"strength": 2.0}, backdoor={"epochs": 8}),
    "blend": Attack("blend"),
}


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run; `full()` and `tiny()` are the two presets."""

    simclr: SimCLRConfig
    backdoor: BackdoorConfig  # trigger and drupe are set per attack
    attacks: tuple[str, ...]
    detector: DetectorConfig
    train: TrainConfig
    aux_images: int  # in-distribution auxiliary images (Fashion-MNIST train, unseen by SimCLR)
    aux_poison: float  # fraction of those carrying the trigger
    ood_images: int  # MNIST digits as out-of-distribution auxiliary data
    test_images: int  # Fashion-MNIST test images before removing the target class
    score_settings: tuple[tuple[int, int], ...] = ((0, 1), (6, 4))  # (visible patches, mask draws)
    downstream: DownstreamConfig = DownstreamConfig()
    ood_attacks: tuple[str, ...] = ("badencoder",)  # attacks that also get the MNIST-trained detector
    min_asr: float = 0.8  # an attack below this success rate does not judge detectors
    eval_train: int = 10_000  # probe / kNN training images for the victim's accuracy
    knn_k: int = 10


def full() -> BenchConfig:
    return BenchConfig(
        simclr=SimCLRConfig(width=16, epochs=4, train_images=20_000),
        backdoor=BackdoorConfig(target=0, references=10, shadow_images=2000, epochs=4, batch_size=64, lr=1e-3),
        attacks=tuple(ATTACKS), detector=cpu(), train=TrainConfig(epochs=12, batch_size=256, holdout=500),
        aux_images=5000, aux_poison=0.01, ood_images=5000, test_images=2000)


def tiny() -> BenchConfig:
    small = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    return BenchConfig(
        simclr=SimCLRConfig(width=4, epochs=1, train_images=256, batch_size=64),
        backdoor=BackdoorConfig(target=0, references=4, shadow_images=128, epochs=1, batch_size=32, lr=1e-3),
        attacks=("badencoder",), detector=cpu(**small), train=TrainConfig(epochs=1, batch_size=64, holdout=32,
                                                                          knn_bank=256),
        aux_images=256, aux_poison=0.02, ood_images=256, test_images=96, score_settings=((0, 1), (6, 2)),
        min_asr=0.0, eval_train=256, downstream=DownstreamConfig(train_images=256, rate=0.04))


def _rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def _outside_scores(path: Path, images: Tensor, region: Tensor) -> np.ndarray:
    """Diagnostic: squared error summed over the patches that miss `region` (bool H x W), all patches hidden."""
    model, encoder, _ = load_detector(path)
    p = model.config.patch_size
    g = region.shape[0] // p
    keep = ~region.reshape(g, p, g, p).any(dim=3).any(dim=1).flatten()  # patchify's row-major order
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x01 = images[i:i + 256].float() / 255
            x = model.normalize(x01)
            noise = torch.zeros(len(x), model.config.num_patches)
            latent, mask, ids_restore = model.forward_encoder(x, encoder(x01), noise, 0)
            out.append(model.pixel_errors(x, model.forward_decoder(latent, ids_restore), mask * keep))
    return torch.cat(out).double().numpy()


def _victim(name: str, bench: BenchConfig, cache: Path, log: Log) -> tuple[dict[str, Any], str]:
    """The attack's backdoored encoder (its spec) and the result so far: what was planted and how well it works."""
    attack = ATTACKS[name]
    backdoor = dataclasses.replace(bench.backdoor, trigger=attack.trigger, **attack.backdoor)
    recipe = VictimRecipe(simclr=bench.simclr, backdoor=backdoor, trigger_args=attack.args,
                          pretrained=attack.pretrained)
    _, bad = build_victim(recipe, cache, log=log)
    spec = recipe.spec(bad)
    result: dict[str, Any] = {"attack": name, "trigger": attack.trigger, "trigger_args": attack.args,
                              "encoder": attack.pretrained or f"SimCLR cifar-resnet18 width {bench.simclr.width}",
                              "backdoor": dataclasses.asdict(backdoor), "victim": evaluate_victim(
                                  spec, trigger=attack.trigger, target=backdoor.target, trigger_args=attack.args,
                                  train_images=bench.eval_train)}
    asr = result["victim"]["attack_success_rate"]
    result["works"] = asr >= bench.min_asr
    if not result["works"]:
        log(f"{name}: ASR {asr:.2f} below {bench.min_asr}: not used to judge detectors")
    return result, spec


def _images(attack: Attack, bench: BenchConfig, target: int) -> tuple[Tensor, int, Tensor, Tensor]:
    """(evaluation images: clean non-target test images then the same triggered, how many are clean,
    in-distribution auxiliary images with `aux_poison` of them triggered, MNIST digits as OOD auxiliary images)."""
    trigger, args = attack.trigger, attack.args
    train_x, _ = fashion_mnist_32("train")
    test_x, test_y = fashion_mnist_32("test")
    test_x, test_y = test_x[: bench.test_images], test_y[: bench.test_images]
    clean_eval = _rgb(test_x[test_y != target])
    eval_images = torch.cat([clean_eval, _rgb(apply_trigger(trigger, clean_eval, **args))])
    aux = _rgb(train_x[50_000: 50_000 + bench.aux_images]).clone()
    poisoned = torch.randperm(len(aux), generator=torch.Generator().manual_seed(1))[
        : int(round(bench.aux_poison * len(aux)))]
    aux[poisoned] = _rgb(apply_trigger(trigger, aux[poisoned], **args))
    digits, _ = load_mnist_digits()
    ood = _rgb(torch.from_numpy(np.pad(digits[: bench.ood_images], ((0, 0), (2, 2), (2, 2))))[:, None])
    return eval_images, len(clean_eval), aux, ood


def _dede_rows(detectors: dict[str, Path], eval_images: Tensor, n_neg: int, bench: BenchConfig, cache: Path
               ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """A row per detector and score setting; the scores of the first setting, for the ROC plot."""
    rows, curves = {}, {}
    for det_name, path in detectors.items():
        for visible, draws in bench.score_settings:
            scores = score_images(path, eval_images, ScoreConfig(visible=visible, draws=draws), cache=cache)
            label = f"{det_name} v{visible} k{draws}"
            rows[label] = table_row(scores["score"][:n_neg], scores["score"][n_neg:], scores["calib_score"])
            if (visible, draws) == bench.score_settings[0]:
                curves[label] = scores["score"]
    return rows, curves


def _baseline_rows(spec: str, aux: Tensor, eval_images: Tensor, n_neg: int, k: int
                   ) -> tuple[dict[str, dict], np.ndarray]:
    """Rows of the embedding baselines, on the victim's embeddings with the auxiliary images as the bank; and the
    k-NN scores (the shipped knn_score against that bank, its label-free threshold from the bank's own rows)."""
    embed = embedder(spec)
    bank, emb = embed(aux), embed(eval_images)
    knn = knn_distance(emb, bank, k).double().numpy()
    rows = {"knn_distance": table_row(knn[:n_neg], knn[n_neg:], baselines.bank_knn_distance(bank, k))}
    slof = baselines.slof(bank, emb, k=k)
    rows["slof"] = table_row(slof[:n_neg], slof[n_neg:], None)
    spectral = baselines.spectral_signature(emb, clusters=10)
    rows["spectral_signature"] = table_row(spectral[:n_neg], spectral[n_neg:], None)
    return rows, knn


def run_attack(name: str, bench: BenchConfig, cache: Path, log: Log) -> dict[str, Any]:
    """Backdoor, evaluate the victim, then every detector on the same evaluation set, then the downstream probe."""
    attack = ATTACKS[name]
    result, spec = _victim(name, bench, cache, log)
    if not result["works"]:
        return result
    target = result["backdoor"]["target"]
    eval_images, n_neg, aux, ood = _images(attack, bench, target)
    detectors = {
        "dede_id": fit_detector(cache, f"{name}-id", aux, spec, bench.detector, bench.train, log),
        "mae_ablation": fit_detector(cache, f"{name}-id", aux, spec, bench.detector.replace(use_global=False),
                                     bench.train, log),
    }
    if name in bench.ood_attacks:  # each detector costs minutes of 2 cores: the OOD one runs on BadEncoder
        detectors["dede_ood"] = fit_detector(cache, f"{name}-ood", ood, spec, bench.detector, bench.train, log)
    rows, curves = _dede_rows(detectors, eval_images, n_neg, bench, cache)
    region = trigger_mask(attack.trigger, bench.detector.img_size, **attack.args)
    if not region.all():  # a localised trigger: does the error outside it still separate?
        for det_name in ("dede_id", "mae_ablation"):
            outside = _outside_scores(detectors[det_name], eval_images, region)
            rows[f"{det_name} v0 k1, error outside the trigger (diagnostic)"] = table_row(
                outside[:n_neg], outside[n_neg:], None)
    baseline_rows, knn = _baseline_rows(spec, aux, eval_images, n_neg, bench.knn_k)
    rows.update(baseline_rows)
    first = f"dede_id v{bench.score_settings[0][0]} k{bench.score_settings[0][1]}"
    fused = metrics.rank_average(curves[first], knn)
    rows["dede_id + knn (rank average)"] = table_row(fused[:n_neg], fused[n_neg:], None)
    result.update(rows=rows, eval_negatives=n_neg, eval_positives=len(eval_images) - n_neg,
                  curves={k: (v[:n_neg].tolist(), v[n_neg:].tolist()) for k, v in
                          {**curves, "knn_distance": knn}.items()})
    result["downstream"] = _downstream(detectors["dede_id"], rows[first]["threshold"], spec, bench,
                                       attack.trigger, target, attack.args, log)
    return result


def _downstream(path: Path, threshold: float, spec: str, bench: BenchConfig, trigger: str, target: int,
                args: dict, log: Log) -> dict[str, Any]:
    """The probe before and after removing what dede_id flags at `threshold`, its label-free 5% threshold in the
    first score setting (the table's row)."""
    visible, draws = bench.score_settings[0]
    scorer, _ = load_scorer(str(path), ScoreConfig(visible=visible, draws=draws))

    def score(images: Tensor, prefix: str) -> np.ndarray:
        keys = [f"{prefix}_{i:06d}" for i in range(len(images))]
        victim = fit_tensor(_rgb(images), scorer.encoder.view)
        return scorer.score(_rgb(images), keys, victim=victim).score.double().numpy()

    n = bench.downstream.train_images
    train_x, train_y = fashion_mnist_32("train")
    test_x, test_y = fashion_mnist_32("test")
    log(f"downstream: probe on {bench.downstream.train_images} labelled images, "
        f"{bench.downstream.rate:.0%} triggered and relabelled")
    result = evaluate_filtering(
        embed=embedder(spec), score=score, threshold=threshold, train=(_rgb(train_x[:n]), train_y[:n]),
        test=(_rgb(test_x[: bench.test_images]), test_y[: bench.test_images]), trigger=trigger, target=target,
        trigger_args=args, config=bench.downstream)
    return {"detector": f"dede_id v{visible} k{draws}", "threshold": threshold, **result}


def result_path(cache: Path, bench: BenchConfig, attack: str) -> Path:
    """Where one attack's finished result is kept: named by the attack's and the bench's settings."""
    settings = dataclasses.asdict(bench)
    settings.pop("attacks")
    return cache / "results" / f"{attack}-{config_digest(settings, dataclasses.asdict(ATTACKS[attack]))}.json"


def run_bench(bench: BenchConfig, cache_dir: str | Path, out_dir: str | Path, *, name: str = "detection",
              log: Log | None = None) -> dict[str, Any]:
    """Run every attack (cached steps are reused) and write OUT/<name>.md, OUT/<name>.json and ROC PNGs.

    The table and JSON are rewritten after each attack, so a run stopped part-way leaves what it finished.
    """
    log = log or stderr_log
    cache = Path(cache_dir)
    return run_report(bench.attacks, config=json.loads(json.dumps(dataclasses.asdict(bench), default=str)),
                      out_dir=out_dir, name=name, stored=lambda attack: result_path(cache, bench, attack),
                      compute=lambda attack: run_attack(attack, bench, cache, log),
                      title=lambda attack, result: f"{attack} ({result['trigger']})", render=render_markdown,
                      log=log)
