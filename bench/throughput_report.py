"""throughput.md and throughput.json: one section per measured setting, the hand-written Notes kept.

A report's `kind` picks its renderer: the score-stage setting of `dede bench throughput` (the default),
`clean-scale` (bench/clean_speed.py) and `size-scale` (bench/size_scale.py).
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: CPU, cores, memory, GPU name (None without CUDA), torch, load."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(gib, 1), "gpu": gpu,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()], "host": platform.node()}


def _row(what: str, value: str, how: str) -> str:
    return f"| {what} | {value} | {how} |"


# A device's second precision (bench.throughput.second_precision): result-key suffix, how the rows name it.
SECOND = (("bf16", "opt-in bf16 autocast (`dede score --bf16`)"), ("fp32", "fp32 instead of bf16 (`dede score --fp32`)"))


def _throughput_section(name: str, report: dict[str, Any]) -> list[str]:
    cfg, m, r, q = report["config"], report["machine"], report["results"], report["ratios"]
    rate = lambda part: f"{r[part]['images_per_s']:,.1f} img/s"  # noqa: E731
    verdict = lambda name: ("" if q[name]["target"] is None else  # noqa: E731
                            f" (target >= {q[name]['target']:g}: {'met' if q[name]['met'] else 'missed'})")
    small_n, e2e = r["memory"]["small"], r["end_to_end"]
    lines = [f"## {name}", "",
             f"Device {cfg['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}; preset `{cfg['preset']}` (random "
             f"weights); images {cfg['image_size']}x{cfg['image_size']}, patch {cfg['patch_size']}; encoder "
             f"`{cfg['encoder']}`; batch {cfg['batch_size']}, chunk {cfg['chunk']}, decoding workers "
             f"{cfg['workers']}, torch threads {m['torch_threads']}. Date {report['date']}; machine: {m['cpu']}, "
             f"{m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}; load average at the end "
             f"{', '.join(str(v) for v in m['load_average'])}; command `{report['command']}` "
             f"({report['wall_s'] / 60:.1f} min).", "",
             "| what | measured | how |", "| --- | --- | --- |",
             _row("(a) limit: encoder + detector forward, in memory", rate("limit"),
                  f"Scorer.score on {cfg['limit_images']} pre-decoded uint8 images, repeated for "
                  f"{r['limit']['seconds']:.0f} s in all, half before and half after (b): "
                  f"{r['limit']['before_images_per_s']:,.1f} then {r['limit']['after_images_per_s']:,.1f} img/s"),
             _row("(b) end to end: score stage, tar shards in, Parquet out", rate("end_to_end"),
                  f"score_shards on {e2e['images']:,} PNG samples in {e2e['seconds']:.1f} s (detector load "
                  f"included); (a), (b) and (c) run in one fresh process that imports only dede_core"),
             _row("(c) naive reference-style loop", rate("naive"),
                  f"PIL Dataset over the PNG files, default DataLoader, fp32, numpy masks, whole-batch forward; "
                  f"{r['naive']['images']:,} images, nothing written"),
             *[row for second, how in SECOND if f"limit_{second}" in r for row in (
                 _row(f"(a) limit, {how}", rate(f"limit_{second}"), "as (a)"),
                 _row(f"(b) end to end, {how}", rate(f"end_to_end_{second}"), f"as (b); end to end / {second} limit "
                      f"{r[f'end_to_end_{second}']['images_per_s'] / r[f'limit_{second}']['images_per_s']:.3f}"))],
             *[_row(f"(b) end to end{label}, {r[part]['workers']} decoding process(es) instead of {cfg['workers']}",
                    rate(part), f"as (b){label}, with the other decoding process count; / its limit "
                    f"{r[part]['images_per_s'] / r[limit]['images_per_s']:.3f}")
               for part, label, limit in (("end_to_end_other_workers", "", "limit"),
                                          *((f"end_to_end_{s}_other_workers", f", {s}", f"limit_{s}") for s, _ in SECOND))
               if part in r],
             _row("decoding alone (tar read + PIL decode)", rate("decode"),
                  f"DataLoader, decoding workers {cfg['workers']}, no model"),
             _row("(d) clean", f"{r['clean']['clean_mb_per_s']:,.1f} MB/s",
                  f"dede_core.stages.clean.clean dropping the top 5% (--quantile 0.95), {r['clean']['bytes'] / 1e6:.1f} MB "
                  f"in {r['clean']['shards']} shards, median of {cfg['copies']}"),
             _row("(d) plain copy of the same shards", f"{r['clean']['copy_mb_per_s']:,.1f} MB/s",
                  "shutil.copyfile of each tar, median of the same runs"),
             _row("plain copy + fsync of each tar (reference only)", f"{r['clean']['copy_fsync_mb_per_s']:,.1f} MB/s",
                  "clean fsyncs each shard before its marker; the target compares with the plain copy"),
             _row("peak RSS of the score process", f"{small_n['peak_rss_mib']:.0f} MiB at {small_n['images']:,} images, "
                  f"{e2e['peak_rss_mib']:.0f} MiB at {e2e['images']:,}",
                  f"ru_maxrss of that process (the 1/10 corpus first, both after the first (a) run); its largest "
                  f"decoding worker {small_n['worker_peak_rss_mib']:.0f} / "
                  f"{e2e['worker_peak_rss_mib']:.0f} MiB"),
             "", "| ratio | value |", "| --- | --- |",
             f"| end to end / limit | {q['end_to_end_vs_limit']['ratio']:.3f}{verdict('end_to_end_vs_limit')} |",
             f"| end to end / naive | {q['end_to_end_vs_naive']['ratio']:.2f}x{verdict('end_to_end_vs_naive')} |",
             f"| clean / copy | {q['clean_vs_copy']['ratio']:.3f}{verdict('clean_vs_copy')} |",
             f"| peak RSS, 10x corpus / 1x corpus | {q['peak_rss_large_vs_small']['ratio']:.3f} |", ""]
    return lines


NOTES = "## Notes"  # throughput.md from this heading on is written by hand and kept when the tables are redone
INTRO = ("Written by `dede bench throughput` (bench/throughput.py), `python -m bench.clean_speed` and `python -m "
         "bench.size_scale` (bench/throughput_report.py renders them); every number is in `throughput.json`. "
         "Score-stage corpora: the first Fashion-MNIST training images, zero-padded to 32x32 (and resized for other "
         "sizes), written as grayscale PNGs and sharded by `dede_core.stages.shard`. The detector and the "
         "cifar-resnet18 victim have seeded random weights, the k-NN bank random embeddings: speed does not depend "
         "on their values. The checkpoint carries no calibration images, so the end-to-end rate is the corpus alone.")


def write_report(name: str, report: dict[str, Any], out_dir: str) -> tuple[str, str]:
    """Merge one setting's report into OUT/throughput.json under `name` (other settings kept) and render
    OUT/throughput.md, keeping its hand-written part (from the NOTES heading on)."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, "throughput.json"), os.path.join(out_dir, "throughput.md")
    settings: dict[str, Any] = {}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            settings = json.load(f)
    settings[name] = report
    with open(json_path, "w") as f:
        json.dump(settings, f, indent=2, sort_keys=True)
    lines = ["# Scoring and cleaning throughput (issues #7, #15, #22)", "", INTRO, ""]
    for key in sorted(settings):
        lines += RENDERERS[settings[key].get("kind", "throughput")](key, settings[key])
    if os.path.isfile(md_path):
        with open(md_path) as f:
            kept = f.read()
        if f"\n{NOTES}\n" in kept:
            lines.append(kept[kept.index(f"\n{NOTES}\n") + 1:].rstrip() + "\n")
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    return md_path, json_path


def _header(name: str, report: dict[str, Any], what: str) -> list[str]:
    m = report["machine"]
    return [f"## {name}", "", f"{what} Date {report.get('date', '?')}; machine: {m['cpu']}, {m['cores']} cores, "
            f"{m['memory_gib']} GiB{', GPU ' + m['gpu'] if m.get('gpu') else ''}, torch {m['torch']}; load average "
            f"at the end {', '.join(str(v) for v in m['load_average'])}; command `{report['command']}` "
            f"({report['wall_s'] / 60:.1f} min).", ""]


def _clean_scale_section(name: str, report: dict[str, Any]) -> list[str]:
    cfg, q = report["config"], report["ratios"]
    mb = lambda part: f"{report[part + '_mb_per_s']:,.0f} MB/s"  # noqa: E731
    runs = lambda part: ", ".join(f"{report['bytes'] / 1e6 / s:,.0f}" for s in report["seconds"][part])  # noqa: E731
    target = f" (target >= 0.5: {'met' if q['clean_vs_copy'] >= 0.5 else 'missed'})"
    target_fsync = f" (target >= 0.8: {'met' if q['clean_vs_copy_fsync'] >= 0.8 else 'missed'})"
    cpu = report.get("median_cpu_seconds", {})
    cpu_s = lambda part: f"; CPU {cpu[part]:.2f} s" if part in cpu else ""  # noqa: E731
    rounds = lambda key: ", ".join(f"{v:.2f}" for v in report.get("round_ratios", {}).get(key, []))  # noqa: E731
    return _header(name, report, f"Clean against a plain copy on {report['bytes'] / 1e9:.2f} GB: {report['samples']:,} "
                   f"{cfg['image_size']}x{cfg['image_size']} RGB JPEGs "
                   f"({report['bytes'] / report['samples'] / 1e3:.1f} "
                   f"kB a sample with its tar headers) in {report['shards']} shards written by the shard stage (spans "
                   f"recorded), synthetic scores, clean dropping the top {cfg['drop']:.0%}; every row run "
                   f"{cfg['copies']} times in turn (os.sync before each), median counted, all from the page cache.") + [
        "| what | measured | runs (MB/s) |", "| --- | --- | --- |",
        f"| plain copy (shutil.copyfile, no fsync) | {mb('copy')}{cpu_s('copy')} | {runs('copy')} |",
        f"| copy + fsync of each shard | {mb('copy_fsync')}{cpu_s('copy_fsync')} | {runs('copy_fsync')} |",
        f"| one sha256 pass over the shards (reference) | {mb('sha256')}{cpu_s('sha256')} | {runs('sha256')} |",
        *([f"| one BLAKE3 pass over the shards (reference) | {mb('blake3')}{cpu_s('blake3')} | {runs('blake3')} |"]
          if "blake3_mb_per_s" in report else []),
        f"| clean with the recorded spans | {mb('clean')}{cpu_s('clean')} | {runs('clean')} |",
        f"| clean parsing the tars (no spans files) | {mb('clean_parsed')}{cpu_s('clean_parsed')} | "
        f"{runs('clean_parsed')} |",
        f"| fixed cost per shard | {report['fixed_s_per_shard'] * 1e3:.1f} ms | clean of {cfg['tiny_shards']} "
        f"one-sample shards against one, per extra shard |",
        f"| fixed cost per run | {report['fixed_s_per_run'] * 1e3:.0f} ms | clean of one one-sample shard, less "
        f"one shard's cost |",
        "", "| ratio | value |", "| --- | --- |",
        f"| clean / plain copy | {q['clean_vs_copy']:.3f}{target}; round by round {rounds('clean_vs_copy')} |",
        f"| clean / copy + fsync | {q['clean_vs_copy_fsync']:.3f}{target_fsync}; round by round "
        f"{rounds('clean_vs_copy_fsync')} |",
        f"| clean with spans / clean parsing the tars | {q['clean_vs_clean_parsed']:.2f}x |", "",
        *(["| where one clean's time goes (under cProfile) | seconds |", "| --- | --- |",
           *[f"| {label} | {seconds:.2f} |" for label, seconds in report["parts_s"].items()], ""]
          if "parts_s" in report else [])]


def cpu_fit(sizes: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Least-squares CPU seconds = fixed + per_image * images over the sizes; then each size's CPU time an image
    with the fixed part taken off, and the highest over the lowest of those (1.0: the cost is flat in size)."""
    n = [float(k) for k in sizes]
    cpu = [sizes[k]["cpu_seconds"] for k in sizes]
    mean_n, mean_cpu = sum(n) / len(n), sum(cpu) / len(cpu)
    per_image = (sum((a - mean_n) * (b - mean_cpu) for a, b in zip(n, cpu))
                 / sum((a - mean_n) ** 2 for a in n))
    fixed = mean_cpu - per_image * mean_n
    marginal = [(c - fixed) / a * 1e3 for a, c in zip(n, cpu)]
    return {"fixed_cpu_s": fixed, "cpu_ms_per_image": per_image * 1e3, "marginal_max_over_min": max(marginal) /
            min(marginal), "marginal_ms": dict(zip(sizes, marginal))}


def _size_scale_section(name: str, report: dict[str, Any]) -> list[str]:
    cfg, q = report["config"], report["ratios"]
    flat = lambda ratio, limit: ("flat" if 0 < ratio <= limit else "not flat" if ratio > 0  # noqa: E731
                                 else "no fit: a size cost less than the fixed start, a disturbed run")
    lines = _header(name, report, f"The score stage at corpus sizes 10x apart, each scored in a fresh process: "
                    f"{report['corpus']}; victim `{cfg['encoder']}` (seeded random weights), cpu preset, batch "
                    f"{cfg['batch_size']}, chunk {cfg['chunk']}, {cfg['workers']} decoding worker(s), "
                    f"{cfg['samples_per_shard']} samples a shard, fp32.")
    lines += ["| images | CPU time an image (process + workers) | rate (load and start included) | steady rate "
              "(first to last shard marker) | peak RSS, scoring process | peak RSS, largest decoding worker |",
              "| --- | --- | --- | --- | --- | --- |"]
    for n, r in sorted(report["sizes"].items(), key=lambda item: int(item[0])):
        lines.append(f"| {int(n):,} | {r['cpu_ms_per_image']:.2f} ms | {r['images_per_s']:,.1f} img/s "
                     f"({r['seconds']:.1f} s) | {r['steady_images_per_s']:,.1f} img/s | {r['peak_rss_mib']:,.0f} MiB "
                     f"| {r['worker_peak_rss_mib']:,.0f} MiB |")
    fit = cpu_fit(report["sizes"])
    return lines + ["", "| ratio over the sizes | value |", "| --- | --- |",
                    f"| CPU time an image, highest / lowest | {q['cpu_per_image_max_over_min']:.3f} |",
                    f"| CPU time an image less the fixed start, highest / lowest | {fit['marginal_max_over_min']:.3f}"
                    f" (target <= 1.10: {flat(fit['marginal_max_over_min'], 1.10)}); least squares over the sizes: "
                    f"{fit['fixed_cpu_s']:.2f} CPU-s fixed + {fit['cpu_ms_per_image']:.3f} CPU-ms an image |",
                    f"| steady rate, fastest / slowest | {q['steady_max_over_min']:.3f} |",
                    f"| rate with the fixed start, fastest / slowest | {q['rate_max_over_min']:.3f} |",
                    f"| peak RSS, largest / smallest corpus | {q['peak_rss_largest_over_smallest']:.3f} |",
                    f"| worker peak RSS, largest / smallest corpus | {q['worker_rss_largest_over_smallest']:.3f} |", ""]


def _gpu_check_section(name: str, report: dict[str, Any]) -> list[str]:
    tests = report["tests"]
    verdict = lambda ok: "met" if ok else "missed"  # noqa: E731
    what = "Tiny machinery check (no figure to read) on" if report["tiny"] else "GPU check on"
    lines = _header(name, report, f"{what} "
                    f"{report['device_name'] or report['device']}; GPU tests: "
                    f"{'not run' if tests is None else tests['summary']}. On CUDA the score stage runs under bf16 "
                    f"autocast by default (`default`) and in fp32 with `dede score --fp32`; each precision is compared "
                    f"with its own limit; the naive loop is fp32.")
    lines += ["| setting | precision | end to end | / naive (target >= 3x) | / its limit (target >= 0.70) |",
              "| --- | --- | --- | --- | --- |"]
    for setting, rows in sorted(report["settings"].items()):
        for precision, t in (rows.items() if "default" in rows else [("default", rows)]):  # older reports: one row
            lines.append(f"| {setting} | {precision} | {t['end_to_end_images_per_s']:,.1f} img/s | {t['vs_naive']:.2f}x "
                         f"({verdict(t['vs_naive_met'])}) | {t['vs_limit']:.3f} ({verdict(t['vs_limit_met'])}) |")
    return lines + [""]


def _decode_speed_section(name: str, report: dict[str, Any]) -> list[str]:
    cfg = report["config"]
    lines = _header(name, report, f"One sample decoded to the detector's and the victim's views (grayscale and RGB "
                    f"at the view side) by dede's decoder (PIL; JPEG through draft()) and by torchvision.io "
                    f"(decode_image, then antialiased resize and centre crop per view), one torch thread, "
                    f"{cfg['samples']} images x {cfg['reps']}, median of {cfg['rounds']} rounds; the bare decodes "
                    f"(no views) for reference. `python -m bench.decode_speed` (bench/decode_speed.py).")
    lines += ["| case | bytes | dede (PIL) | torchvision.io | torchvision / dede | bare decode: PIL, torchvision |",
              "| --- | --- | --- | --- | --- | --- |"]
    for case, r in report["cases"].items():
        lines.append(f"| {case} | {r['bytes']:,.0f} | {r['dede_ms']:.3f} ms | {r['torchvision_ms']:.3f} ms | "
                     f"{r['torchvision_ms'] / r['dede_ms']:.2f} | {r['pil_bare_ms']:.3f}, "
                     f"{r['torchvision_bare_ms']:.3f} ms |")
    return lines + [""]


RENDERERS = {"throughput": _throughput_section, "clean-scale": _clean_scale_section,
             "size-scale": _size_scale_section, "gpu-check": _gpu_check_section, "decode-speed": _decode_speed_section}
