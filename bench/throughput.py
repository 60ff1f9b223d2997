"""`dede bench throughput`: the score stage against the forward-pass limit and a naive loop, and clean against a copy.

One run on one device measures, on real Fashion-MNIST images written as PNG shards:
  limit      encoder + detector forward on pre-decoded uint8 tensors in memory (Scorer.score), images/s
  end-to-end score_shards: tar shards in, Parquet out, in a fresh process (peak RSS measured there), images/s
  naive      a loop built like the reference implementation's evaluation: map-style Dataset decoding PNG files
             with PIL, default DataLoader (no workers), fp32, one mask draw from global numpy state, one
             encoder + decoder forward per batch, scores kept in memory (nothing written), images/s
  clean      dede_core.stages.clean.clean on the scored shards against shutil.copyfile of the same tars, MB/s
The detector has random weights and its k-NN bank random embeddings: speed does not depend on their values.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dede_core.detector.checkpoint import load_detector, save_checkpoint
from dede_core.detector.config import preset
from bench import throughput_report
from bench.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, write_image_folder
from bench.throughput_report import machine
from dede_core.detector.encoders import cifar_resnet18, load_encoder, parse_spec
from dede_core.io.loader import decode_workers, make_loader
from dede_core.detector.model import DeDe
from dede_core.detector.scorer import ScoreConfig, Scorer
from dede_core.stages.select import Rule
from dede_core.stages.shard import write_shards
from dede_core.io.sources import TarShardSource

# Issue #7's targets, as fractions.
TARGETS = {"cpu_end_to_end_vs_limit": 0.85, "gpu_end_to_end_vs_limit": 0.70, "gpu_end_to_end_vs_naive": 3.0,
           "clean_vs_copy": 0.50}


@dataclass(frozen=True)
class ThroughputConfig:
    """One benchmark setting; saved in the JSON next to its numbers."""

    preset: str = "cpu"  # detector preset (config.PRESETS), random weights
    image_size: int = 32  # side of the corpus PNGs and of the detector's input
    patch_size: int = 4  # detector patch side (4 at 32x32 as in the reference; 16 at 224x224 as in MAE)
    encoder: str = "cifar-resnet18?width=64"  # victim spec; a cifar-resnet18 without weights= gets seeded ones
    images: int = 10_000  # corpus scored end to end and by the naive loop; the memory check also scores 1/10
    limit_seconds: float = 10.0  # the in-memory limit runs this long before and again after the end-to-end run
    limit_images: int = 1024  # pre-decoded images held in memory for the limit
    batch_size: int = 256  # decoded images per batch, for the stage and the naive loop
    workers: int | None = None  # decoding processes of the stage (None: dede_core.io.loader.decode_workers)
    chunk: int = 64  # ScoreConfig.chunk: rows per forward pass
    samples_per_shard: int = 1000
    knn_bank: int = 5000  # k-NN bank rows in the checkpoint (TrainConfig's default)
    copies: int = 3  # clean and copy each run this often; the median counts
    second_precision: bool = True  # also the limit and end to end in the device's other precision (SECOND)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.images < 10:
            raise ValueError(f"images must be >= 10 (the memory check also scores images // 10), got {self.images}")
        for name in ("limit_images", "batch_size", "chunk", "samples_per_shard", "copies"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _corpus_images(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n Fashion-MNIST training images, zero-padded to 32x32, resized to size: uint8 (n, size, size)."""
    images, labels = load_fashion_mnist("train")
    if n > len(images):
        raise ValueError(f"images must be <= {len(images)} (Fashion-MNIST train), got {n}")
    x = torch.from_numpy(np.pad(images[:n], ((0, 0), (2, 2), (2, 2))))[:, None]
    if size != 32:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False).round().clamp(0, 255)
    return x[:, 0].to(torch.uint8).numpy(), labels[:n]


def write_corpus(work: str, name: str, images: np.ndarray, labels: np.ndarray, samples_per_shard: int) -> str:
    """PNG folder work/<name>-png, sharded into work/<name> by the project's own shard code; returns the shards."""
    folder, shards = os.path.join(work, f"{name}-png"), os.path.join(work, name)
    write_image_folder(images, labels, folder, class_names=FASHION_MNIST_CLASSES, prefix="fm")
    write_shards(folder, shards, samples_per_shard=samples_per_shard, progress=False)
    return shards


def write_detector(work: str, bench: ThroughputConfig) -> str:
    """A seeded random detector for the bench's encoder, with a random k-NN bank and no calibration images."""
    spec = parse_spec(bench.encoder)
    torch.manual_seed(0)
    if spec.kind == "cifar-resnet18" and not spec.option("weights"):
        path = os.path.join(work, "encoder.pt")
        torch.save(cifar_resnet18(width=spec.option("width"), in_chans=spec.option("chans")).state_dict(), path)
        spec = parse_spec(f"{bench.encoder}&weights={path}" if "?" in bench.encoder else f"{bench.encoder}?weights={path}")
    encoder = load_encoder(str(spec))
    config = preset(bench.preset, img_size=bench.image_size, patch_size=bench.patch_size)
    model = DeDe(config=config, global_dim=encoder.dim)
    path = os.path.join(work, "detector.pt")
    bank = torch.randn(bench.knn_bank, encoder.dim).half()
    save_checkpoint(path, model=model, encoder_spec=encoder.spec, encoder_fingerprint=encoder.fingerprint,
                    calibration={"keys": [], "knn_bank": bank})
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def second_precision(device: str) -> tuple[str, dict[str, bool]]:
    """The precision a device scores in when asked, beside its default, and the ScoreConfig options that ask:
    bf16 autocast on the CPU (opt-in, `dede score --bf16`), fp32 on CUDA (opt-out of bf16, `dede score --fp32`)."""
    return ("fp32", {"cuda_fp32": True}) if torch.device(device).type == "cuda" else ("bf16", {"cpu_bf16": True})


def measure_limit(detector: str, images: torch.Tensor, bench: ThroughputConfig, *,
                  options: dict[str, bool] | None = None) -> dict[str, float]:
    """(a) Scorer.score, one batch_size slice at a time, on pre-decoded uint8 images already in memory, cycling
    over them for limit_seconds; `options`: ScoreConfig precision options (second_precision)."""
    model, encoder, ckpt = load_detector(detector)
    config = ScoreConfig(chunk=bench.chunk, **(options or {}))
    scorer = Scorer(detector=model, encoder=encoder, config=config, device=bench.device, references=ckpt.knn_bank)
    keys = [f"k{i}" for i in range(len(images))]
    scorer.score(images[:bench.chunk], keys[:bench.chunk])  # warm-up: allocator, kernels, lazy inits
    device, done, start = torch.device(bench.device), 0, time.perf_counter()
    while True:
        at = done % len(keys)
        scorer.score(images[at:at + bench.batch_size], keys[at:at + bench.batch_size])
        _sync(device)
        done += len(keys[at:at + bench.batch_size])
        elapsed = time.perf_counter() - start
        if elapsed >= bench.limit_seconds:
            return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed}


def measure_decode(shards: str, bench: ThroughputConfig) -> dict[str, float]:
    """Decoding alone, as the stage's workers do it (tar read + PIL decode), images/s: no model at all."""
    config = preset(bench.preset, img_size=bench.image_size, patch_size=bench.patch_size)
    tars = sorted(os.path.join(shards, n) for n in os.listdir(shards) if n.endswith(".tar"))
    views = (config.view, load_encoder(bench.encoder).view)
    loader = make_loader(TarShardSource(tars), views=views, batch_size=bench.batch_size, workers=bench.workers)
    start, done = time.perf_counter(), 0
    for batch in loader:
        done += len(batch["key"])
    elapsed = time.perf_counter() - start
    return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed}


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (decoding workers): unlike wall time,
    it hardly moves when other jobs share the cores."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child() -> None:
    """Entry of the measuring process: the steps of the JSON job on stdin, in order, each timed; prints one JSON list.
    A stage step also reports the process' peak RSS so far (ru_maxrss only grows: score small corpora first)."""
    from dede_core.stages.score import score_shards

    job = json.load(sys.stdin)
    torch.set_num_threads(job["threads"])
    bench = ThroughputConfig(**job["bench"])
    reports = []
    for step in job["steps"]:
        if step["kind"] == "limit":
            images = torch.load(step["images"], weights_only=True)
            reports.append(measure_limit(step["detector"], images, bench, options=step["options"]))
        elif step["kind"] == "naive":
            reports.append(measure_naive(step["png_root"], step["detector"], bench))
        else:
            args = {name: value for name, value in step.items() if name != "kind"}
            args["score"] = ScoreConfig(**args["score"])
            start, cpu = time.perf_counter(), _cpu_seconds()
            result = score_shards(progress=False, **args)
            elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
            # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN is the largest DataLoader worker (joined by now).
            reports.append({"images": result.samples, "ok": result.ok, "seconds": elapsed, "workers": args["workers"],
                            "images_per_s": result.samples / elapsed, "cpu_seconds": cpu,
                            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})
    print(json.dumps(reports))


def stage_step(shards: str, detector: str, out: str, bench: ThroughputConfig, *, options: dict[str, bool] | None = None,
               workers: int | None = None) -> dict[str, Any]:
    """(b) one score_shards call of the measuring process (with bench.workers decoding processes unless told;
    `options`: ScoreConfig precision options)."""
    return {"kind": "stage", "shards_dir": shards, "detector": detector, "out_dir": out,
            "score": {"chunk": bench.chunk, **(options or {})}, "batch_size": bench.batch_size,
            "workers": bench.workers if workers is None else workers, "device": bench.device}


def measure_in_child(bench: ThroughputConfig, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the steps in one fresh interpreter that imports only dede_core: the limit, the stage and the naive loop
    then share one process state (the CLI's own process also holds Prefect), and the peak RSS is the stage's own."""
    job = {"threads": torch.get_num_threads(), "bench": asdict(bench), "steps": steps}
    code = "from bench.throughput import child; child()"
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process exited with {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class _PngFiles(Dataset):
    """The reference's kind of dataset: one PNG file per item, PIL decode, ToTensor-like float in [0, 1]."""

    def __init__(self, root: str) -> None:
        self.paths = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.endswith(".png"))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
        return torch.from_numpy(array).permute(2, 0, 1)


def measure_naive(png_root: str, detector: str, bench: ThroughputConfig) -> dict[str, float]:
    """(c) the reference-style loop: default DataLoader, fp32, numpy-global masks, one forward per whole batch."""
    model, encoder, _ = load_detector(detector)
    device = torch.device(bench.device)
    model, encoder = model.to(device).eval(), encoder.to(device)
    visible, length = model.config.score_visible, model.config.num_patches
    np.random.seed(0)
    scores, start = [], time.perf_counter()
    with torch.no_grad():
        for x01 in DataLoader(_PngFiles(png_root), batch_size=bench.batch_size):
            x01 = x01.to(device)
            embedding = encoder(x01)
            x = model.normalize(x01)
            noise = torch.from_numpy(np.random.rand(len(x01), length)).float().to(device)
            latent, mask, ids_restore = model.forward_encoder(x, embedding, noise, visible)
            scores.append(model.pixel_errors(x, model.forward_decoder(latent, ids_restore), mask).cpu())
    elapsed = time.perf_counter() - start
    done = int(sum(len(s) for s in scores))
    return {"images": done, "seconds": elapsed, "images_per_s": done / elapsed}


def _tar_bytes(shards: str) -> tuple[list[str], int]:
    tars = sorted(os.path.join(shards, n) for n in os.listdir(shards) if n.endswith(".tar"))
    return tars, sum(os.path.getsize(t) for t in tars)


def measure_clean(shards: str, scores: str, work: str, bench: ThroughputConfig) -> dict[str, Any]:
    """(d) clean (drop the top 5% by score) against shutil.copyfile of the same tars; median MB/s of `copies` runs."""
    from dede_core.stages.clean import clean

    tars, total = _tar_bytes(shards)
    copy_s, synced_s, clean_s = [], [], []
    for i in range(bench.copies):
        for synced, times in ((False, copy_s), (True, synced_s)):
            target = os.path.join(work, f"copy-{i}-{'fsync' if synced else 'plain'}")
            os.makedirs(target)
            start = time.perf_counter()
            for tar in tars:
                shutil.copyfile(tar, os.path.join(target, os.path.basename(tar)))
                if synced:  # clean makes each shard durable before its marker; a plain copy does not
                    fd = os.open(os.path.join(target, os.path.basename(tar)), os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        clean(shards, scores, os.path.join(work, f"clean-{i}"), Rule.quantile(0.95), progress=False)
        clean_s.append(time.perf_counter() - start)
    copy, synced, cleaned = (statistics.median(t) for t in (copy_s, synced_s, clean_s))
    return {"bytes": total, "shards": len(tars), "copy_seconds": copy, "clean_seconds": cleaned,
            "copy_mb_per_s": total / 1e6 / copy, "copy_fsync_mb_per_s": total / 1e6 / synced,
            "clean_mb_per_s": total / 1e6 / cleaned}


def _ratios(results: dict[str, Any], device: str) -> dict[str, dict[str, Any]]:
    """Each issue #7 target that applies on this device: measured ratio, target, met."""
    limit, stage = results["limit"]["images_per_s"], results["end_to_end"]["images_per_s"]
    naive, clean = results["naive"]["images_per_s"], results["clean"]
    small, large = results["memory"]["small"]["peak_rss_mib"], results["end_to_end"]["peak_rss_mib"]
    gpu = device.startswith("cuda")
    ratios = {"end_to_end_vs_limit": (stage / limit, TARGETS["gpu_end_to_end_vs_limit" if gpu else
                                                             "cpu_end_to_end_vs_limit"]),
              "end_to_end_vs_naive": (stage / naive, TARGETS["gpu_end_to_end_vs_naive"] if gpu else None),
              "clean_vs_copy": (clean["clean_mb_per_s"] / clean["copy_mb_per_s"], TARGETS["clean_vs_copy"]),
              "peak_rss_large_vs_small": (large / small, None)}
    return {name: {"ratio": ratio, "target": target, "met": None if target is None else ratio >= target}
            for name, (ratio, target) in ratios.items()}


def run_bench(bench: ThroughputConfig, work: str, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement of one setting; work is a scratch folder (corpora, checkpoint, outputs)."""
    os.makedirs(work, exist_ok=True)
    if bench.workers is None:  # the stage's default, resolved here so that the report names the count
        bench = replace(bench, workers=decode_workers(bench.device))
    started, small_n = time.perf_counter(), bench.images // 10
    images, labels = _corpus_images(bench.images, bench.image_size)
    shards = write_corpus(work, "corpus", images, labels, bench.samples_per_shard)
    small = write_corpus(work, "corpus-small", images[:small_n], labels[:small_n], bench.samples_per_shard)
    detector = write_detector(work, bench)
    log(f"corpus: {bench.images} and {small_n} PNGs at {bench.image_size}x{bench.image_size}; device {bench.device}")
    pre_decoded = os.path.join(work, "limit-images.pt")
    torch.save(torch.from_numpy(images[:bench.limit_images])[:, None].expand(-1, 3, -1, -1).contiguous(), pre_decoded)
    results: dict[str, Any] = {"decode": measure_decode(shards, bench)}
    log(f"decode only ({bench.workers} workers): {results['decode']['images_per_s']:.1f} img/s")
    second, options = second_precision(bench.device)
    limit = {"kind": "limit", "detector": detector, "images": pre_decoded, "options": {}}
    # The limit brackets the stage (a drift in load shows); the 1/10 corpus runs first for the peak RSS.
    steps = [limit, stage_step(small, detector, os.path.join(work, "scores-small"), bench),
             stage_step(shards, detector, os.path.join(work, "scores"), bench), limit,
             {"kind": "naive", "png_root": os.path.join(work, "corpus-png"), "detector": detector}]
    if bench.second_precision:
        steps += [stage_step(shards, detector, os.path.join(work, f"scores-{second}"), bench, options=options),
                  limit | {"options": options}]
    # The decoding process count the stage did not choose, end to end beside it: the sizing rule's evidence.
    other = 1 if bench.workers == 0 else 0
    others = [("end_to_end_other_workers", {})] + (
        [(f"end_to_end_{second}_other_workers", options)] if bench.second_precision else [])
    steps += [stage_step(shards, detector, os.path.join(work, f"scores-{name}"), bench, options=on, workers=other)
              for name, on in others]
    measured = measure_in_child(bench, steps)
    before, small_run, large_run, after, results["naive"] = measured[:5]
    done, seconds = before["images"] + after["images"], before["seconds"] + after["seconds"]
    results["limit"] = {"images": done, "seconds": seconds, "images_per_s": done / seconds,
                        "before_images_per_s": before["images_per_s"], "after_images_per_s": after["images_per_s"]}
    results["end_to_end"], results["memory"] = large_run, {"small": small_run}
    log(f"limit (forward on in-memory tensors): {before['images_per_s']:.1f} img/s, then {after['images_per_s']:.1f}")
    log(f"end to end (score_shards): {large_run['images_per_s']:.1f} img/s; peak RSS "
        f"{small_run['peak_rss_mib']:.0f} MiB after {small_n} images, {large_run['peak_rss_mib']:.0f} after {bench.images}")
    log(f"naive reference-style loop: {results['naive']['images_per_s']:.1f} img/s")
    for (name, _), report in zip(others, measured[len(measured) - len(others):]):
        results[name] = report
        log(f"end to end with {other} decoding process(es){f', {second}' if second in name else ''}: "
            f"{report['images_per_s']:.1f} img/s")
    if bench.second_precision:
        results[f"end_to_end_{second}"], results[f"limit_{second}"] = measured[5:7]
        log(f"{second}: limit {results[f'limit_{second}']['images_per_s']:.1f} img/s, end to end "
            f"{results[f'end_to_end_{second}']['images_per_s']:.1f} img/s")
    results["clean"] = measure_clean(shards, os.path.join(work, "scores"), work, bench)
    log(f"clean {results['clean']['clean_mb_per_s']:.1f} MB/s, copy {results['clean']['copy_mb_per_s']:.1f} MB/s")
    return {"config": asdict(bench), "machine": machine(), "results": results,
            "ratios": _ratios(results, bench.device), "wall_s": time.perf_counter() - started,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def setting_name(bench: ThroughputConfig) -> str:
    """The section a setting's numbers go to, e.g. cpu-32px-cifar-resnet18-cpu."""
    return f"{bench.preset}-{bench.image_size}px-{parse_spec(bench.encoder).kind}-{torch.device(bench.device).type}"


def command_line(bench: ThroughputConfig) -> str:
    """The `dede bench throughput` command that measures this setting."""
    workers = "" if bench.workers is None else f" --workers {bench.workers}"
    return (f"dede bench throughput --preset {bench.preset} --image-size {bench.image_size} --patch-size "
            f"{bench.patch_size} --encoder '{bench.encoder}' --images {bench.images} --limit-seconds "
            f"{bench.limit_seconds:g} --batch-size {bench.batch_size} --chunk {bench.chunk}{workers} "
            f"--device {bench.device}{'' if bench.second_precision else ' --one-precision'}")


def write_report(report: dict[str, Any], out_dir: str) -> tuple[str, str]:
    """Merge one setting's report into OUT/throughput.json and render OUT/throughput.md (bench.throughput_report)."""
    return throughput_report.write_report(setting_name(ThroughputConfig(**report["config"])), report, out_dir)
