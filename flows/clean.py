"""Flow: write the cleaned corpus, the clean stage (dede_core.stages.clean.CLEAN) run by flows/stage.py, then its
HTML report (dede_core.stages.report).

The plan selects, claims OUT and fixes each shard's duplicate keys; then one task per pending shard, in threads
or on Dask workers (flows/runners.py), then the final files. Any engine writes the same bytes.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from dede_core.detector.health import describe_health
from dede_core.io import storage
from dede_core.signals.verdict import describe
from dede_core.stages.clean import CLEAN, CleanRun, CleanSettings
from dede_core.stages.decisions import decided
from dede_core.stages.report import write_report
from dede_core.stages.select import select
from flows.runners import Engine
from flows.stage import run_stage
from schemas.manifest import read_manifest


@task(name="write-report", cache_policy=NONE)
def report_task(scores: str, shards: str, out_html: str, settings: CleanSettings,
                thumbnails: int) -> str:
    # The Selection is rebuilt from the scores (one query) rather than passed between tasks as an Arrow table.
    selection = select(scores, settings.rule, keep_unscored=settings.keep_unscored,
                       retired=read_manifest(shards).retired, neighbours=settings.neighbours)
    selection, _ = decided(selection, settings.decisions)
    return write_report(scores, shards, out_html, selection=selection, n_thumbs=thumbnails)


@flow(name="dede-clean")
def clean_flow(shards: str, scores: str, out: str, settings: CleanSettings = CleanSettings(),
               engine: Engine = Engine(), report: bool = True, report_path: str | None = None,
               thumbnails: int = 24) -> dict:
    """OUT/<shard>.tar minus what settings.rule (default fdr 0.05) drops, OUT/rejected.parquet, summary.json,
    manifest.json (settings.copy=False: the verdicts only, rejected.parquet and summary.json); then the HTML
    report at report_path (default OUT/report.html, with `thumbnails` sample images) unless report=False. A rerun
    that cleans nothing new keeps an existing report. engine: local, dask or dask://HOST:PORT
    (flows/runners.py). Folders may be fsspec URLs. Returns counts, paths and workers (shard -> "host:pid" that
    cleaned it)."""
    done = run_stage(CLEAN, CleanRun(shards, scores, out, settings), engine)
    result = done.result
    c, sel = result.counts, result.selection
    get_run_logger().info(f"kept {c.kept} of {c.total}, dropped {c.dropped} ({c.unscored} unscored); "
                          f"{sel.rule.label}: {sel.how}; {len(result.written)} shards written -> {result.out_dir}")
    summary = {"out": result.out_dir, "counts": c.to_dict(), "rule": sel.rule.label, "threshold": sel.threshold,
               "how": sel.how, "written": result.written, "skipped": result.skipped,
               "rejected": result.rejected_path, "summary": result.summary_path, "workers": done.workers,
               "report": None}
    _flagged_artifact(sel)
    if sel.verdict is not None:  # what each signal found and what the cut removes, on the run's page
        create_markdown_artifact(key="dede-clean-verdict", markdown="\n".join(
            ["# dede verdict", "", *[f"- {line}" for line in describe(sel.verdict.summary)], "",
             f"- {describe_health(sel.detector_health)}"]),
            description=f"the combined verdict ({sel.rule.label})")
    if report:
        path = report_path or storage.join(storage.absolute(out), "report.html")
        summary["report"] = path
        if result.written or not storage.isfile(path):
            report_task(scores, shards, path, settings, thumbnails)
        create_link_artifact(key="dede-clean-report", link=path if storage.is_url(path) else f"file://{path}",
                             link_text="report.html", description="histogram, counts and thumbnails of the selection")
    return summary


FLAGGED_ROWS = 20


def _flagged_artifact(selection) -> None:
    """The most-flagged dropped samples as a table on the run's page (key, shard, source, score, reason)."""
    dropped = selection.dropped
    rows = [row for row in dropped.to_pylist() if row.get("score") is not None]
    rows = sorted(rows, key=lambda r: -r["score"])[:FLAGGED_ROWS]
    columns = [c for c in ("key", "shard", "source", "score", "reason") if c in dropped.column_names]
    create_table_artifact(key="dede-clean-flagged", table=[{c: row.get(c) for c in columns} for row in rows],
                          description=f"the {len(rows)} highest-scored of {dropped.num_rows} dropped samples "
                                      f"({selection.rule.label})")
