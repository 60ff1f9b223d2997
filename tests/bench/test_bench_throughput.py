"""dede bench throughput end to end on a tiny corpus: the report's structure, and every measured rate positive."""

from __future__ import annotations

import json

import pytest
import torch

from bench import throughput as bt
from flows.cli import main

TINY = ["--images", "40", "--limit-seconds", "0.2", "--batch-size", "16", "--chunk", "8", "--workers", "1",
        "--encoder", "cifar-resnet18?width=8"]
RATES = [("limit", "images_per_s"), ("decode", "images_per_s"), ("end_to_end", "images_per_s"),
         ("naive", "images_per_s"), ("clean", "clean_mb_per_s"), ("clean", "copy_mb_per_s"),
         ("clean", "copy_fsync_mb_per_s")]


def check_report(report: dict, device: str) -> None:
    results = report["results"]
    for part, rate in RATES:
        assert results[part][rate] > 0, (part, rate)
    if device == "cpu":  # the opt-in bf16 rows
        assert results["limit_bf16"]["images_per_s"] > 0 and results["end_to_end_bf16"]["images_per_s"] > 0
    assert results["end_to_end"]["images"] == results["naive"]["images"] == 40
    assert results["memory"]["small"]["images"] == 4
    assert results["end_to_end"]["peak_rss_mib"] > 0 and results["memory"]["small"]["peak_rss_mib"] > 0
    assert report["config"]["device"] == device and report["machine"]["cores"] >= 1
    assert set(report["ratios"]) == {"end_to_end_vs_limit", "end_to_end_vs_naive", "clean_vs_copy",
                                     "peak_rss_large_vs_small"}
    for row in report["ratios"].values():
        assert row["ratio"] > 0 and (row["met"] is None) == (row["target"] is None)


def test_cli_writes_the_report_and_keeps_notes(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "throughput.md").write_text("old tables\n\n## Notes\n\nwritten by hand\n")
    assert main(["bench", "throughput", *TINY, "--device", "cpu", "--out", str(out), "--work", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "end_to_end_vs_limit:" in printed and "clean_vs_copy:" in printed
    settings = json.loads((out / "throughput.json").read_text())
    assert list(settings) == ["cpu-32px-cifar-resnet18-cpu"]
    report = settings["cpu-32px-cifar-resnet18-cpu"]
    check_report(report, "cpu")
    assert report["command"].startswith("dede bench throughput --preset cpu --image-size 32")
    md = (out / "throughput.md").read_text()
    assert "## cpu-32px-cifar-resnet18-cpu" in md and "old tables" not in md
    assert md.rstrip().endswith("## Notes\n\nwritten by hand")
    for row in ("(a) limit", "(b) end to end", "opt-in bf16", "(c) naive", "(d) clean", "peak RSS", "end to end / limit"):
        assert row in md
    assert list(tmp_path.glob("dede-throughput-*")) == []  # the scratch folder is gone


@pytest.mark.gpu
def test_cuda_run(tmp_path):
    bench = bt.ThroughputConfig(images=40, limit_seconds=0.2, batch_size=16, chunk=8, workers=1,
                                encoder="cifar-resnet18?width=8", device="cuda")
    report = bt.run_bench(bench, str(tmp_path))
    check_report(report, "cuda")
    assert report["machine"]["gpu"] == torch.cuda.get_device_name(0)
