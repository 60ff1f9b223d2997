"""dede bench throughput end to end on a tiny corpus: the report's structure, and every measured rate positive."""

from __future__ import annotations

import json

import pytest
import torch

from bench import clean_speed, decode_speed, gpu_check, size_scale, throughput_report
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
    second = "bf16" if device == "cpu" else "fp32"  # the device's second precision: opt-in bf16, opt-out fp32
    assert results[f"limit_{second}"]["images_per_s"] > 0 and results[f"end_to_end_{second}"]["images_per_s"] > 0
    # End to end again with the decoding process count the stage did not choose (the sizing rule's evidence).
    other = 1 if report["config"]["workers"] == 0 else 0
    for part in ("end_to_end_other_workers", f"end_to_end_{second}_other_workers"):
        assert results[part]["images_per_s"] > 0 and results[part]["workers"] == other, part
    assert results["end_to_end"]["workers"] == report["config"]["workers"]
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
    for row in ("(a) limit", "(b) end to end", "opt-in bf16", "(c) naive", "(d) clean", "peak RSS", "end to end / limit",
                "0 decoding process(es) instead of 1"):
        assert row in md
    assert list(tmp_path.glob("dede-throughput-*")) == []  # the scratch folder is gone


@pytest.mark.gpu
def test_cuda_run(tmp_path):
    bench = bt.ThroughputConfig(images=40, limit_seconds=0.2, batch_size=16, chunk=8, workers=1,
                                encoder="cifar-resnet18?width=8", device="cuda")
    report = bt.run_bench(bench, str(tmp_path))
    check_report(report, "cuda")
    assert report["machine"]["gpu"] == torch.cuda.get_device_name(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_refuses_without_cuda(tmp_path, capsys):
    assert gpu_check.main(["--no-tests", "--out", str(tmp_path / "out")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # the CPU is only for checking the steps
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "out")])


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    """make bench-gpu's script with --device cpu --tiny: the gpu tests (here one, skipped), both sizes, the rows."""
    out = tmp_path / "results"
    args = ["--device", "cpu", "--tiny", "--tests", "tests/bench/test_bench_throughput.py::test_cuda_run",
            "--out", str(out), "--work", str(tmp_path)]
    assert gpu_check.main(args) == 0
    settings = json.loads((out / "throughput.json").read_text())
    assert sorted(settings) == ["cpu-224px-cifar-resnet18-cpu", "cpu-32px-cifar-resnet18-cpu", "gpu-check-cpu-tiny"]
    check = settings["gpu-check-cpu-tiny"]
    expected = "1 passed" if torch.cuda.is_available() else "1 skipped"
    assert check["tests"]["returncode"] == 0 and expected in check["tests"]["summary"]
    assert sorted(check["settings"]) == ["cpu-224px-cifar-resnet18-cpu", "cpu-32px-cifar-resnet18-cpu"]
    for name, rows in check["settings"].items():
        row = rows["default"]  # the tiny settings measure one precision
        assert list(rows) == ["default"] and row["vs_naive"] > 0 and row["vs_limit"] > 0
        assert row["end_to_end_images_per_s"] > 0
        assert settings[name]["config"]["images"] == 40 and settings[name]["results"]["end_to_end"]["images"] == 40
    md = (out / "throughput.md").read_text()
    assert "## gpu-check-cpu-tiny" in md and "Tiny machinery check" in md and "| cpu-224px-cifar-resnet18-cpu | default |" in md
    assert list(tmp_path.glob("dede-gpu-check-*")) == []


def test_clean_speed_measures_clean_against_a_copy(tmp_path):
    out = tmp_path / "results"
    assert clean_speed.main(["--gigabytes", "0.002", "--samples-per-shard", "40", "--copies", "1",
                             "--work", str(tmp_path), "--out", str(out)]) == 0
    report = json.loads((out / "throughput.json").read_text())["clean-0.002gb-224px"]
    assert report["shards"] >= 2 and report["bytes"] >= 2e6 and report["samples"] >= 80
    for part in ("copy", "copy_fsync", "sha256", "clean", "clean_parsed"):
        assert report[f"{part}_mb_per_s"] > 0
    assert all(seconds > 0 for seconds in report["tiny_clean_seconds"].values())
    assert report["ratios"]["clean_vs_copy"] > 0
    parts = report["parts_s"]  # where one clean's time goes: every part found in the profile, none above the whole
    whole = parts.pop("clean in all (profiled)")
    assert len(parts) == len(clean_speed.PARTS) - 1 and all(0 < seconds <= whole for seconds in parts.values())
    md = (out / "throughput.md").read_text()
    assert "## clean-0.002gb-224px" in md and "| clean / plain copy |" in md and "where one clean's time goes" in md
    assert list(tmp_path.glob("dede-clean-speed-*")) == []


def test_size_scale_scores_each_size_in_its_own_process(tmp_path):
    out = tmp_path / "results"
    assert size_scale.main(["--sizes", "20,40", "--samples-per-shard", "10", "--encoder", "cifar-resnet18?width=8",
                            "--work", str(tmp_path), "--out", str(out)]) == 0
    report = json.loads((out / "throughput.json").read_text())["size-scale-20-40"]
    assert sorted(report["sizes"], key=int) == ["20", "40"]
    for n, row in report["sizes"].items():
        assert row["images"] == row["ok"] == int(n)
        assert row["cpu_ms_per_image"] > 0 and row["steady_images_per_s"] > 0 and row["peak_rss_mib"] > 0
    ratios = report["ratios"]
    assert ratios["cpu_per_image_max_over_min"] >= 1 and ratios["peak_rss_largest_over_smallest"] > 0
    assert "## size-scale-20-40" in (out / "throughput.md").read_text()
    with pytest.raises(ValueError, match="at least 2 shards"):
        size_scale.SizeScaleConfig(sizes=(10, 100), samples_per_shard=10)


def test_decode_speed_compares_both_decoders_on_every_case(tmp_path):
    report = decode_speed.measure(decode_speed.DecodeSpeedConfig(samples=2, reps=1, rounds=1), log=lambda line: None)
    assert len(report["cases"]) == len(decode_speed.CASES)
    for row in report["cases"].values():
        assert all(row[name] > 0 for name in ("bytes", "dede_ms", "torchvision_ms", "pil_bare_ms", "torchvision_bare_ms"))
    views = (decode_speed.View(32, 1), decode_speed.View(32, 3))  # both paths give the views' shapes
    data = decode_speed._images("JPEG", 64, 1)[0]
    assert [tuple(t.shape) for t in decode_speed._torchvision_views(data, views)] == [(1, 32, 32), (3, 32, 32)]
    report |= {"machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "torch": "t", "load_average": [0]},
               "command": "python -m bench.decode_speed"}
    md, _ = throughput_report.write_report("decode-speed", report, str(tmp_path))
    assert "| JPEG 1024px -> 96px |" in open(md).read()
