"""`make bench-gpu`: one short unattended run on a GPU machine gives the GPU figures (issue #15, item 4).

1. Checks CUDA (exit 2 with a message when it is absent).
2. Runs the GPU tests (`pytest -m gpu`) and keeps their result line.
3. Runs `dede bench throughput` on CUDA at 32 px (ResNet-18 width 64) and 224 px (EfficientNet-Lite0): the
   score stage end to end against the in-memory forward limit and the naive fp32 loop, clean against a copy.
   On CUDA the score stage runs under bf16 autocast by default and in fp32 with `dede score --fp32`
   (ScoreConfig.cuda_fp32): each size gives both, the bf16 rows first; the naive loop stays fp32.
4. Writes those sections into OUT/throughput.md and throughput.json, plus a `gpu-check` section with the device
   name, the tests' result, each target (end to end >= 3x naive, >= 0.70 of the limit) and the wall time.
Sized to finish in under 8 minutes; `--device cpu --tiny` runs the same steps in a minute on any machine.
Never part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from bench import throughput as bt
from bench import throughput_report

SETTINGS = {  # name -> the full run's setting; a GPU decodes on the CPU cores it has, one per worker
    "32px": bt.ThroughputConfig(image_size=32, patch_size=4, encoder="cifar-resnet18?width=64", images=10_000,
                                limit_seconds=5.0, batch_size=256, chunk=256),
    "224px": bt.ThroughputConfig(image_size=224, patch_size=16, encoder="efficientnet-lite0", images=2_000,
                                 limit_seconds=5.0, batch_size=128, chunk=128),
}


def tiny(setting: bt.ThroughputConfig) -> bt.ThroughputConfig:
    """The same steps on a few images with a tiny victim: checks the machinery, measures nothing useful."""
    return replace(setting, encoder=f"cifar-resnet18?width=8&size={setting.image_size}", images=40,
                   limit_seconds=0.2, batch_size=16, chunk=8,
                   limit_images=64, knn_bank=256, copies=1, second_precision=False)


def gpu_tests(paths: list[str], timeout_s: float) -> dict[str, Any]:
    """`pytest -m gpu` in a subprocess: its exit code and its last line (e.g. '2 passed in 31.0s')."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *paths]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env=os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"timed out after {timeout_s:.0f} s", "seconds": timeout_s}
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    return {"returncode": done.returncode, "summary": lines[-1] if lines else done.stderr[-300:],
            "seconds": time.perf_counter() - start, "command": " ".join(command[1:])}


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    """Each precision's end to end against the naive loop and against its own limit (the default first)."""
    r, rows = report["results"], {}
    for precision, suffix in (("default", ""), *((s, f"_{s}") for s in ("fp32", "bf16") if f"limit_{s}" in r)):
        stage = r[f"end_to_end{suffix}"]["images_per_s"]
        vs_naive, vs_limit = stage / r["naive"]["images_per_s"], stage / r[f"limit{suffix}"]["images_per_s"]
        rows[precision] = {"end_to_end_images_per_s": stage, "vs_naive": vs_naive, "vs_naive_met": vs_naive >= 3.0,
                           "vs_limit": vs_limit, "vs_limit_met": vs_limit >= 0.70}
    return rows


def run(device: str, out: str, *, small: bool, tests: list[str] | None, work: str | None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every step; returns the gpu-check report (also written to OUT)."""
    started = time.perf_counter()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine (torch.cuda.is_available() is False): run it on a "
                         "GPU machine, or `python -m bench.gpu_check --device cpu --tiny` to check the steps")
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    log(f"device {device}{f' ({name})' if name else ''}")
    checked = gpu_tests(tests, 240) if tests is not None else None
    if checked:
        log(f"gpu tests: {checked['summary']}")
    settings: dict[str, Any] = {}
    for label, setting in SETTINGS.items():
        setting = replace(tiny(setting) if small else setting, device=device)  # run_bench sizes the decoders
        with tempfile.TemporaryDirectory(prefix="dede-gpu-check-", dir=work) as scratch:
            report = bt.run_bench(setting, scratch, log=log)
        report["command"] = bt.command_line(setting)
        bt.write_report(report, out)
        settings[bt.setting_name(setting)] = _targets(report)
        log(f"{label}: {settings[bt.setting_name(setting)]}")
    report = {"kind": "gpu-check", "device": device, "device_name": name, "tiny": small, "tests": checked,
              "settings": settings, "machine": throughput_report.machine(), "wall_s": time.perf_counter() - started,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "make bench-gpu" if not small else f"python -m bench.gpu_check --device {device} --tiny"}
    throughput_report.write_report(f"gpu-check-{device.split(':')[0]}{'-tiny' if small else ''}", report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --tiny, to check the steps)")
    parser.add_argument("--tiny", action="store_true", help="a few images per setting: checks the machinery only")
    parser.add_argument("--tests", nargs="*", default=["tests"], help="paths for `pytest -m gpu` (default tests)")
    parser.add_argument("--no-tests", action="store_true", help="skip the GPU tests")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--work", default=None, help="scratch parent folder (default: the system's temp folder)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu is for checking the steps: add --tiny (the CPU figures come from "
                     "`dede bench throughput`)")
    try:
        report = run(args.device, args.out, small=args.tiny, tests=None if args.no_tests else args.tests,
                     work=args.work)
    except ValueError as e:
        print(f"bench-gpu: {e}", file=sys.stderr)
        return 2
    failed = report["tests"] is not None and report["tests"]["returncode"] != 0
    print(f"wrote {args.out}/throughput.md ({report['wall_s'] / 60:.1f} min){'; GPU TESTS FAILED' if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
