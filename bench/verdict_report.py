"""The verdict suite's Markdown (docs/results/verdict.md): per case and corpus the default rule's cut, the
combined AUROC and each signal's; then every design tried, side by side over the same corpora."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.report import report_header


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mean(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.mean(found)) if found else None


def render_verdict(report: dict[str, Any], name: str) -> str:
    lines = report_header(report, f"Verdict suite ({name})", "cases",
                          "cached victims and detectors reused")
    lines += [f"Command: `dede bench detection --suite verdict --cases {','.join(report['config']['cases'])}` (victims "
              "and detectors cached by config hash in `--cache`).", "",
              "Every figure uses dede's defaults only: the case's detector trained with the defaults, each corpus "
              "sharded, scored, its neighbours computed and selected with the default rule (`--fdr 0.05`, the "
              "combined verdict). Corpora: clean test images with 0 / 0.1 / 1 / 5% triggered images added "
              "(triggered copies of other images), and a clean corpus with near-duplicate groups (2-50 JPEG "
              "re-uploads) making up 5%. 'lost' is the share of the corpus' clean images the cut drops.", "",
              "| case | trigger | aux | corpus | poisoned / N | flagged | precision | recall | clean lost | "
              "combined AUROC | dede | aux_distance | collapse | outlier | recon | old --fpr 0.05: precision / "
              "recall / lost |", "| " + " | ".join(["---"] * 16) + " |"]
    variants: dict[str, dict[str, list]] = {}
    for r in report["results"]:
        if not r.get("works"):
            lines.append(f"| {r['case']} | attack does not work (ASR "
                         f"{r['victim_metrics']['attack_success_rate']:.2f}) |" + " |" * 14)
            continue
        aux = f"{r['aux']} {r['aux_poison']:.1%}" if r["aux"] == "in" else "ood"
        for kind, c in r["corpora"].items():
            d, old = c["default_rule"], c["fpr_0.05"]
            s = c["signals"]
            lines.append(
                f"| {r['case']} | {r['trigger']} | {aux} | {kind} | {c['poisoned']} / {c['samples']} | {d['flagged']} "
                f"| {_f(d['precision'])} | {_f(d['recall'])} | {_f(d['clean_lost'], 4)} | "
                f"{_f(c['variants'][next(iter(c['variants']))]['auroc'])} | {_f(s.get('dede'))} | "
                f"{_f(s.get('aux_distance'))} | {_f(s.get('collapse'))} | {_f(s.get('outlier'))} | "
                f"{_f(s.get('recon'))} | {_f(old['precision'])} / {_f(old['recall'])} / {_f(old['clean_lost'], 4)} |")
            for variant, v in c["variants"].items():
                slot = variants.setdefault(variant, {"auroc": [], "precision": [], "recall": [], "lost_clean": [],
                                                     "lost_dup": []})
                if kind in ("poison-0.01", "poison-0.05"):
                    slot["auroc"].append(v["auroc"])
                    slot["precision"].append(v["precision"] if v["flagged"] else 0.0)
                    slot["recall"].append(v["recall"])
                elif kind == "poison-0":
                    slot["lost_clean"].append(v["clean_lost"])
                elif kind == "near-duplicates":
                    slot["lost_dup"].append(v["clean_lost"])
    lines += ["", "## Designs side by side (means over the cases above)", "",
              "AUROC, precision and recall over the 1% and 5% corpora (precision 0 where nothing was flagged); "
              "loss on the clean corpus and on the near-duplicate corpus.", "",
              "| design | AUROC | precision | recall | clean corpus lost | near-duplicate corpus lost |",
              "| --- | --- | --- | --- | --- | --- |"]
    for variant, slot in variants.items():
        lines.append(f"| {variant} | {_f(_mean(slot['auroc']))} | {_f(_mean(slot['precision']))} | "
                     f"{_f(_mean(slot['recall']))} | {_f(_mean(slot['lost_clean']), 4)} | "
                     f"{_f(_mean(slot['lost_dup']), 4)} |")
    lines += ["", "## Which cases chose the design", "",
              "The three sticker64-photos cases (auxiliary set 1% triggered, clean, out of distribution) chose it: "
              "the bulk-fitted null over the calibration null, the collapse ratio over the k-distances, the Cauchy "
              "cap at 0.5 and collapse's weight. The SIG cases were held out; the first two of them then showed "
              "that combining `dede` loses clean images (the 'with dede' rows), so `dede` left the verdict after "
              "they were measured: sig64-photos-ood-aux and sticker64-photos-aux5% (an old suite case) were evaluated only after that change, and the checks on "
              "corpora and attacks outside the repository are the held-out evidence for the final design. Every "
              "case's per-corpus figures are in verdict.json; `python -m bench.verdict_check RUN --planted KEYS` "
              "gives the same figures for any run whose poison is known."]
    return "\n".join(lines) + "\n"
