"""The detection benchmark's Markdown report (bench.detection writes it after every attack)."""

from __future__ import annotations

from typing import Any

from bench.report import report_header, score_sections

CACHE_NOTE = ("encoders, decoders, scores and finished attacks are cached by config hash and reused; 'wall' is what "
              "an attack took in the run that finished it, without the steps earlier runs had cached, on a machine "
              "shared with other jobs")


def render_markdown(report: dict[str, Any], name: str) -> str:
    """The Markdown report of a detection run: victims, a score table per attack, the downstream probe."""
    lines = report_header(report, f"Detection benchmark ({name})", "attacks", CACHE_NOTE)
    lines += ["## Victims", "",
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
    lines += score_sections(report, "Detectors", "attack", "detector", mark_best=True)
    lines += _downstream_markdown(report)
    return "\n".join(lines) + "\n"


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
