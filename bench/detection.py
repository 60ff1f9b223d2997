"""The detection benchmark: attacks x detectors on real images, with every artifact cached by config hash.

Victim: a SimCLR ResNet-18 trained here on Fashion-MNIST, backdoored by BadEncoder-style fine-tunes with each
trigger. Detectors: DeDe with in-distribution auxiliary data carrying 1% triggered samples and with
out-of-distribution auxiliary data (MNIST digits), the no-embedding ablation, and embedding baselines.
Evaluation set: the clean Fashion-MNIST test images of the non-target classes plus the same images triggered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
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

from bench import baselines, metrics
from bench.attacks import apply_trigger, trigger_mask
from bench.attacks.badencoder import BackdoorConfig
from dede_core.detector.checkpoint import load_detector
from dede_core.detector.config import DetectorConfig, cpu
from bench.datasets import load_mnist_digits
from bench.downstream import DownstreamConfig, evaluate_filtering
from dede_core.detector.encoders import load_encoder
from dede_core.io.images import fit_tensor
from dede_core.detector.knn import knn_distance
from dede_core.detector.scorer import ScoreConfig, load_scorer
from dede_core.io.sources import Sample
from bench.ssl import SimCLRConfig, embed_all
from dede_core.detector.train import TrainConfig, train_detector
from bench.victims import VictimRecipe, build_victim, evaluate_victim, fashion_mnist_32

@dataclass(frozen=True)
class Attack:
    """A trigger, its keyword arguments, and what the fine-tune does differently from the bench's backdoor."""

    trigger: str
    args: dict = dataclasses.field(default_factory=dict)
    backdoor: dict = dataclasses.field(default_factory=dict)  # BackdoorConfig overrides
    pretrained: str | None = None  # a packaged encoder backdoored instead of the SimCLR one (VictimRecipe)


EFFNET = "efficientnet-lite0?size=64"  # ImageNet weights from its package; 32x32 images upsampled to 64 (2 cores)

# WaNet and CTRL at their reference strengths (0.5, 50) stayed below 80% ASR after a 4-epoch fine-tune (0.06,
# 0.47); these are the settings under which they work (scripts/attack_probe.py measured each).
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


class ArraySource:
    """uint8 images (N, C, H, W) as a Source of PNG-encoded samples (what train_detector reads)."""

    def __init__(self, images: Tensor, prefix: str) -> None:
        self.images, self.prefix = images, prefix
        self.classes, self.skipped = None, []

    def __len__(self) -> int:
        return len(self.images)

    def keys(self) -> list[str]:
        return [f"{self.prefix}_{i:06d}" for i in range(len(self.images))]

    def __getitem__(self, index: int) -> Sample:
        array = self.images[index].permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buf, format="PNG")
        return Sample(key=f"{self.prefix}_{index:06d}", data=buf.getvalue(), label=None, meta={})


def _rgb(images: Tensor) -> Tensor:
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def config_digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _fit(cache: Path, name: str, images: Tensor, spec: str, config: DetectorConfig, train: TrainConfig,
         log: Callable[[str], None]) -> Path:
    source = ArraySource(images, name)
    content = f"array:{name}:{hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16]}"
    out = cache / f"detector-{name}-{config_digest(spec, config.to_dict(), dataclasses.asdict(train), content)}"
    return train_detector(source=source, data_id=content, encoder=load_encoder(spec), config=config,
                          train=train, out_dir=out, log=log)


def score_images(path: Path, images: Tensor, score: ScoreConfig = ScoreConfig(), *, knn_k: int = 10,
                 cache: Path | None = None) -> dict[str, np.ndarray]:
    """The shipped scores (score, recon_error, knn_score) of in-memory uint8 images at their native size, each model
    fed its own view as the score stage feeds it, and the same of the checkpoint's held-out calibration images
    (keys prefixed calib_). Kept in `cache/scores` when a cache is given."""
    if cache is not None:
        key = config_digest(hashlib.sha256(path.read_bytes()).hexdigest(),
                      hashlib.sha256(images.numpy().tobytes()).hexdigest(), dataclasses.asdict(score), knn_k)
        stored = cache / "scores" / f"{key}.npz"
        if stored.is_file():
            with np.load(stored) as saved:
                return dict(saved)
    scorer, ckpt = load_scorer(str(path), score)
    bank = ckpt.knn_bank.float() if ckpt.knn_bank is not None else None
    detector_view = fit_tensor(images, scorer.detector.config.view)
    keys = [f"eval_{i:06d}" for i in range(len(images))]
    out = scorer.score(detector_view, keys, victim=fit_tensor(images, scorer.encoder.view))
    calib = scorer.score(ckpt.calibration_images, ckpt.calibration_keys, embedding=ckpt.calibration_embeddings)
    result = {}
    for prefix, part in (("", out), ("calib_", calib)):
        result[prefix + "score"] = part.score.double().numpy()
        result[prefix + "recon_error"] = part.error.double().numpy()
        result[prefix + "knn_score"] = knn_distance(part.embedding, bank, knn_k).double().numpy()
    if cache is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        partial = stored.with_suffix(".partial.npz")
        np.savez(partial, **result)
        partial.replace(stored)
    return result


def _score(path: Path, images: Tensor, visible: int, draws: int,
           cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DeDe scores of images and of the checkpoint's held-out calibration images (kept in `cache` if given)."""
    scores = score_images(path, images, ScoreConfig(visible=visible, draws=draws), cache=cache)
    return scores["score"], scores["calib_score"]


def table_row(neg: np.ndarray, pos: np.ndarray, calib: np.ndarray | None) -> dict[str, Any]:
    row: dict[str, Any] = {"auroc": metrics.auroc(neg, pos), "tpr_at_1": metrics.tpr_at_fpr(neg, pos, 0.01),
                           "tpr_at_5": metrics.tpr_at_fpr(neg, pos, 0.05)}
    if calib is not None:
        threshold = metrics.label_free_threshold(calib, 0.05)
        rates = metrics.rates_at_threshold(neg, pos, threshold)
        row.update(threshold=threshold, label_free_fpr=rates["fpr"], label_free_tpr=rates["tpr"])
    return row


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


def _embed(spec: str) -> Callable[[Tensor], Tensor]:
    """uint8 images -> the victim's embeddings, 256 at a time."""
    return functools.partial(embed_all, load_encoder(spec), batch=256)


def run_attack(name: str, bench: BenchConfig, cache: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Backdoor, evaluate the victim, then every detector on the same evaluation set, then the downstream probe."""
    attack = ATTACKS[name]
    backdoor = dataclasses.replace(bench.backdoor, trigger=attack.trigger, **attack.backdoor)
    recipe = VictimRecipe(simclr=bench.simclr, backdoor=backdoor, trigger_args=attack.args,
                          pretrained=attack.pretrained)
    _, bad = build_victim(recipe, cache, log=log)
    spec, target, trigger, args = recipe.spec(bad), backdoor.target, attack.trigger, attack.args
    result: dict[str, Any] = {"attack": name, "trigger": trigger, "trigger_args": args,
                              "encoder": attack.pretrained or f"SimCLR cifar-resnet18 width {bench.simclr.width}",
                              "backdoor": dataclasses.asdict(backdoor), "victim": evaluate_victim(
                                  spec, trigger=trigger, target=target, trigger_args=args,
                                  train_images=bench.eval_train)}
    asr = result["victim"]["attack_success_rate"]
    result["works"] = asr >= bench.min_asr
    if not result["works"]:
        log(f"{name}: ASR {asr:.2f} below {bench.min_asr}: not used to judge detectors")
        return result
    train_x, _ = fashion_mnist_32("train")
    test_x, test_y = fashion_mnist_32("test")
    test_x, test_y = test_x[: bench.test_images], test_y[: bench.test_images]
    clean_eval = _rgb(test_x[test_y != target])
    triggered_eval = _rgb(apply_trigger(trigger, clean_eval, **args))
    eval_images = torch.cat([clean_eval, triggered_eval])
    n_neg = len(clean_eval)

    aux = _rgb(train_x[50_000: 50_000 + bench.aux_images]).clone()
    poisoned = torch.randperm(len(aux), generator=torch.Generator().manual_seed(1))[
        : int(round(bench.aux_poison * len(aux)))]
    aux[poisoned] = _rgb(apply_trigger(trigger, aux[poisoned], **args))
    digits, _ = load_mnist_digits()
    ood = _rgb(torch.from_numpy(np.pad(digits[: bench.ood_images], ((0, 0), (2, 2), (2, 2))))[:, None])

    detectors = {
        "dede_id": _fit(cache, f"{name}-id", aux, spec, bench.detector, bench.train, log),
        "mae_ablation": _fit(cache, f"{name}-id", aux, spec, bench.detector.replace(use_global=False),
                             bench.train, log),
    }
    if name in bench.ood_attacks:  # each detector costs minutes of 2 cores: the OOD one runs on BadEncoder
        detectors["dede_ood"] = _fit(cache, f"{name}-ood", ood, spec, bench.detector, bench.train, log)
    rows, curves = {}, {}
    for det_name, path in detectors.items():
        for visible, draws in bench.score_settings:
            scores, calib = _score(path, eval_images, visible, draws, cache)
            label = f"{det_name} v{visible} k{draws}"
            rows[label] = table_row(scores[:n_neg], scores[n_neg:], calib)
            if (visible, draws) == bench.score_settings[0]:
                curves[label] = scores
    region = trigger_mask(trigger, bench.detector.img_size, **args)
    if not region.all():  # a localised trigger: does the error outside it still separate?
        for det_name in ("dede_id", "mae_ablation"):
            outside = _outside_scores(detectors[det_name], eval_images, region)
            rows[f"{det_name} v0 k1, error outside the trigger (diagnostic)"] = table_row(
                outside[:n_neg], outside[n_neg:], None)
    embed = _embed(spec)
    bank, emb = embed(aux), embed(eval_images)
    knn = baselines.knn_distance(bank, emb, k=bench.knn_k)
    bank_knn = baselines.knn_distance(bank, bank, k=bench.knn_k, exclude_self=True)
    rows["knn_distance"] = table_row(knn[:n_neg], knn[n_neg:], bank_knn)
    slof = baselines.slof(bank, emb, k=bench.knn_k)
    rows["slof"] = table_row(slof[:n_neg], slof[n_neg:], None)
    spectral = baselines.spectral_signature(emb, clusters=10)
    rows["spectral_signature"] = table_row(spectral[:n_neg], spectral[n_neg:], None)
    first = f"dede_id v{bench.score_settings[0][0]} k{bench.score_settings[0][1]}"
    fused = metrics.rank_average(curves[first], knn)
    rows["dede_id + knn (rank average)"] = table_row(fused[:n_neg], fused[n_neg:], None)
    result.update(rows=rows, eval_negatives=n_neg, eval_positives=len(triggered_eval),
                  curves={k: (v[:n_neg].tolist(), v[n_neg:].tolist()) for k, v in
                          {**curves, "knn_distance": knn}.items()})
    result["downstream"] = _downstream(detectors["dede_id"], rows[first]["threshold"], spec, bench, trigger, target,
                                       args, log)
    return result


def _downstream(path: Path, threshold: float, spec: str, bench: BenchConfig, trigger: str, target: int,
                args: dict, log: Callable[[str], None]) -> dict[str, Any]:
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
        embed=_embed(spec), score=score, threshold=threshold, train=(_rgb(train_x[:n]), train_y[:n]),
        test=(_rgb(test_x[: bench.test_images]), test_y[: bench.test_images]), trigger=trigger, target=target,
        trigger_args=args, config=bench.downstream)
    return {"detector": f"dede_id v{visible} k{draws}", "threshold": threshold, **result}


def result_path(cache: Path, bench: BenchConfig, attack: str) -> Path:
    """Where one attack's finished result is kept: named by the attack's and the bench's settings."""
    settings = dataclasses.asdict(bench)
    settings.pop("attacks")
    return cache / "results" / f"{attack}-{config_digest(settings, dataclasses.asdict(ATTACKS[attack]))}.json"


def cached_result(stored: Path, compute: Callable[[], dict[str, Any]], log: Callable[[str], None]
                  ) -> dict[str, Any]:
    """A finished result read from `stored`, or computed (its wall time added) and written there atomically."""
    if stored.is_file():
        log(f"reusing {stored}")
        return json.loads(stored.read_text())
    t0 = time.perf_counter()
    result = compute()
    result["wall_s"] = time.perf_counter() - t0
    stored.parent.mkdir(parents=True, exist_ok=True)
    partial = stored.with_suffix(".partial")
    partial.write_text(json.dumps(result))
    partial.replace(stored)
    return result


def plot_curves(result: dict[str, Any], path: Path, title: str) -> None:
    """The ROC plot of a result's `curves` ({label: (negatives, positives)}), which it then drops."""
    if result.get("curves"):
        curves = {}
        for label, (neg, pos) in result.pop("curves").items():
            fpr, tpr = metrics.roc_curve(neg, pos)
            curves[label] = (fpr, tpr, metrics.auroc(neg, pos))
        metrics.plot_roc(curves, path, title=title)


def run_bench(bench: BenchConfig, cache_dir: str | Path, out_dir: str | Path, *, name: str = "detection",
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every attack (cached steps are reused) and write OUT/<name>.md, OUT/<name>.json and ROC PNGs.

    The table and JSON are rewritten after each attack, so a run stopped part-way leaves what it finished.
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    cache, out = Path(cache_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "config": json.loads(json.dumps(dataclasses.asdict(bench), default=str)), "results": [],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d")}
    for attack in bench.attacks:
        result = cached_result(result_path(cache, bench, attack), lambda: run_attack(attack, bench, cache, log), log)
        plot_curves(result, out / f"{name}-roc-{attack}.png", f"{attack} ({result['trigger']})")
        report["results"].append(result)
        report["wall_s"] = time.perf_counter() - started
        report["finished"] = len(report["results"]) == len(bench.attacks)
        (out / f"{name}.json").write_text(json.dumps(report, indent=1))
        (out / f"{name}.md").write_text(render_markdown(report, name))
    return report


def render_markdown(report: dict[str, Any], name: str) -> str:
    done = len(report["results"])
    partial = "" if report["finished"] else f" Partial: {done} of {len(report['config']['attacks'])} attacks done."
    lines = [f"# Detection benchmark ({name})", "",
             f"Date {report['date']}; machine: {report['machine']}; this run's wall time "
             f"{report['wall_s'] / 60:.1f} min (encoders, decoders, scores and finished attacks are cached by config "
             "hash and reused; 'wall' is what an attack took in the run that finished it, without the steps earlier "
             "runs had cached, on a machine shared with other jobs)." + partial,
             "", "## Victims", "",
             "| attack | encoder | trigger | fine-tune | kNN acc | probe clean acc | ASR | used | wall (min) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        v = r["victim"]
        trigger = r["trigger"] + "".join(f" {k}={x}" for k, x in r.get("trigger_args", {}).items())
        b = r.get("backdoor", {})
        tune = f"{b.get('epochs', '?')} ep, lr {b.get('lr', 0):g}" + (" + DRUPE terms" if b.get("drupe") else "")
        used = "yes" if r["works"] else "no (ASR < threshold)"
        lines.append(f"| {r['attack']} | {r.get('encoder', '')} | {trigger} | {tune} | {v['knn_accuracy']:.3f} "
                     f"| {v['clean_accuracy']:.3f} | {v['attack_success_rate']:.3f} | {used} "
                     f"| {r['wall_s'] / 60:.1f} |")
    lines += ["", "## Detectors (AUROC; TPR at 1% / 5% FPR; FPR and TPR at the label-free 5% threshold)", ""]
    for r in report["results"]:
        if not r.get("rows"):
            continue
        lines += [f"### {r['attack']} ({r['eval_negatives']} clean + {r['eval_positives']} triggered)", ""]
        lines += rows_markdown(r["rows"], "detector", mark_best=True)
    lines += _downstream_markdown(report)
    return "\n".join(lines) + "\n"


def rows_markdown(rows: dict[str, dict[str, Any]], what: str, *, mark_best: bool = False) -> list[str]:
    """A table of table_row results: AUROC, TPR at 1% and 5% FPR, the label-free threshold's FPR and TPR."""
    lines = [f"| {what} | AUROC | TPR@1% | TPR@5% | label-free FPR | label-free TPR |",
             "| --- | --- | --- | --- | --- | --- |"]
    best = max(row["auroc"] for row in rows.values())
    for label, row in rows.items():
        mark = " **(best)**" if mark_best and row["auroc"] == best else ""
        lf = f"{row['label_free_fpr']:.3f} | {row['label_free_tpr']:.3f}" if "label_free_fpr" in row else "— | —"
        lines.append(f"| {label}{mark} | {row['auroc']:.3f} | {row['tpr_at_1']:.3f} | {row['tpr_at_5']:.3f} | {lf} |")
    return lines + [""]


def _downstream_markdown(report: dict[str, Any]) -> list[str]:
    done = [r for r in report["results"] if r.get("downstream")]
    if not done:
        return []
    lines = ["## Downstream: linear probe on a training set with triggered, relabelled samples", "",
             "Removal at dede_id's label-free 5% threshold; 'screened' = the same detector also rejects test "
             "inputs above it (a triggered input succeeds only if accepted and classified as the target).", "",
             "| attack | planted / train | removed (planted, clean) | clean acc before -> after | "
             "ASR before -> after | screened: ASR, clean rejected |", "| --- | --- | --- | --- | --- | --- |"]
    for r in done:
        d = r["downstream"]
        lines.append(f"| {r['attack']} | {d['planted']} / {d['train_images']} | {d['removed']} ({d['removed_planted']}"
                     f", {d['removed_clean']}) | {d['clean_accuracy_before']:.3f} -> {d['clean_accuracy_after']:.3f} "
                     f"| {d['asr_before']:.3f} -> {d['asr_after']:.3f} | {d['screen_asr']:.3f}, "
                     f"{d['screen_clean_rejected']:.3f} |")
    return lines + [""]
