"""How a benchmark run reports: results computed (or reused) one at a time, and after each the ROC plot, the JSON
and the Markdown table rewritten, so a run stopped part-way leaves what it finished."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from bench import metrics
from bench.common import cached_result

Log = Callable[[str], None]


def stderr_log(text: str) -> None:
    """The benchmarks' default log: one line on stderr, flushed at once."""
    print(text, file=sys.stderr, flush=True)


def plot_curves(result: dict[str, Any], path: Path, title: str) -> None:
    """The ROC plot of a result's `curves` ({label: (negatives, positives)}), which it then drops."""
    if result.get("curves"):
        curves = {}
        for label, (neg, pos) in result.pop("curves").items():
            fpr, tpr = metrics.roc_curve(neg, pos)
            curves[label] = (fpr, tpr, metrics.auroc(neg, pos))
        metrics.plot_roc(curves, path, title=title)


def run_report(items: Sequence[str], *, config: dict[str, Any], out_dir: str | Path, name: str,
               stored: Callable[[str], Path], compute: Callable[[str], dict[str, Any]],
               title: Callable[[str, dict[str, Any]], str], render: Callable[[dict[str, Any], str], str],
               log: Log) -> dict[str, Any]:
    """Each item's result read from stored(item) or computed, in order; after each, OUT/<name>-roc-<item>.png,
    OUT/<name>.json and OUT/<name>.md (render(report, name)) are written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "config": config, "results": [],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d")}
    for item in items:
        result = cached_result(stored(item), lambda: compute(item), log)
        plot_curves(result, out / f"{name}-roc-{item}.png", title(item, result))
        report["results"].append(result)
        report["wall_s"] = time.perf_counter() - started
        report["finished"] = len(report["results"]) == len(items)
        (out / f"{name}.json").write_text(json.dumps(report, indent=1))
        (out / f"{name}.md").write_text(render(report, name))
    return report


def report_header(report: dict[str, Any], title: str, unit: str, note: str) -> list[str]:
    """The title, then date, machine and wall time (`note` says what was reused), and how many of the config's
    `unit` (its list of attacks or cases) are done when the run is partial."""
    done, total = len(report["results"]), len(report["config"][unit])
    partial = "" if report["finished"] else f" Partial: {done} of {total} {unit} done."
    return [f"# {title}", "", f"Date {report['date']}; machine: {report['machine']}; this run's wall time "
            f"{report['wall_s'] / 60:.1f} min ({note})." + partial, ""]


def score_sections(report: dict[str, Any], title: str, name_key: str, what: str, *, mark_best: bool = False,
                   notes: Callable[[dict[str, Any]], list[str]] | None = None) -> list[str]:
    """'## title' with what the columns mean, then for each result with rows: '### <result[name_key]> (N clean +
    M triggered)', its `notes` lines and its rows_markdown table (first column headed `what`)."""
    lines = ["", f"## {title} (AUROC; TPR at 1% / 5% FPR; FPR and TPR at the label-free 5% threshold)", ""]
    for r in report["results"]:
        if not r.get("rows"):
            continue
        lines += [f"### {r[name_key]} ({r['eval_negatives']} clean + {r['eval_positives']} triggered)", ""]
        lines += notes(r) if notes else []
        lines += rows_markdown(r["rows"], what, mark_best=mark_best)
    return lines


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
