"""Flow: write the cleaned corpus (task: dede_core.clean.clean), then its HTML report (dede_core.report)."""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from dede_core.clean import clean
from dede_core.report import write_report
from dede_core.select import DEFAULT_RULE, Rule, select


@task(name="clean-shards", cache_policy=NONE)
def clean_task(shards: str, scores: str, out: str, rule: dict[str, Any], keep_unscored: bool) -> dict:
    result = clean(shards, scores, out, Rule.from_dict(rule), keep_unscored=keep_unscored)
    c, sel = result.counts, result.selection
    get_run_logger().info(f"kept {c.kept} of {c.total}, dropped {c.dropped} ({c.unscored} unscored); "
                          f"{sel.rule.label}: {sel.how}; {len(result.written)} shards written -> {out}")
    return {"out": result.out_dir, "counts": c.to_dict(), "rule": sel.rule.label, "threshold": sel.threshold,
            "how": sel.how, "written": result.written, "skipped": result.skipped,
            "rejected": result.rejected_path, "summary": result.summary_path}


@task(name="write-report", cache_policy=NONE)
def report_task(scores: str, shards: str, out_html: str, rule: dict[str, Any], keep_unscored: bool) -> str:
    # The Selection is rebuilt from the scores (one query) rather than passed between tasks as an Arrow table.
    selection = select(scores, Rule.from_dict(rule), keep_unscored=keep_unscored)
    return write_report(scores, shards, out_html, selection=selection)


@flow(name="dede-clean")
def clean_flow(shards: str, scores: str, out: str, rule: dict[str, Any] | None = None, keep_unscored: bool = False,
               report: bool = True, report_path: str | None = None) -> dict:
    """OUT/<shard>.tar minus what `rule` (Rule.to_dict(); default fpr 0.05) drops, OUT/rejected.parquet,
    summary.json, manifest.json; then the HTML report at report_path (default OUT/report.html) unless
    report=False. A rerun that cleans nothing new keeps an existing report. Returns counts and paths."""
    rule = rule or DEFAULT_RULE.to_dict()
    result = clean_task(shards, scores, out, rule, keep_unscored)
    result["report"] = None
    if report:
        path = report_path or os.path.join(out, "report.html")
        result["report"] = path
        if result["written"] or not os.path.isfile(path):
            report_task(scores, shards, path, rule, keep_unscored)
    return result
