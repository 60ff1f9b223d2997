"""Flow: write the cleaned corpus, then its HTML report (dede_core.stages.report).

With the local runner one task cleans every shard in order (dede_core.stages.clean.clean). With a Dask runner
(flows/runners.py) the same steps run shard by shard on the workers: plan (select, claim OUT), the sample keys
of every shard (for the duplicate-key check across shards), one task per pending shard, then the final files.
Both write the same bytes.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from dede_core.io import storage
from dede_core.stages.clean import (CleanPlan, CleanResult, ShardJob, clean, clean_shard, earlier_keys, finish_clean,
                             plan_clean, sample_keys, start_clean)
from dede_core.stages.report import write_report
from dede_core.stages.select import DEFAULT_RULE, Rule, select
from flows import retry_transient
from flows.runners import LOCAL, ShardRunner, parse_runner, worker_identity
from schemas.manifest import read_manifest


def _summary(result: CleanResult, workers: dict[str, str]) -> dict:
    c, sel = result.counts, result.selection
    get_run_logger().info(f"kept {c.kept} of {c.total}, dropped {c.dropped} ({c.unscored} unscored); "
                          f"{sel.rule.label}: {sel.how}; {len(result.written)} shards written -> {result.out_dir}")
    return {"out": result.out_dir, "counts": c.to_dict(), "rule": sel.rule.label, "threshold": sel.threshold,
            "how": sel.how, "written": result.written, "skipped": result.skipped,
            "rejected": result.rejected_path, "summary": result.summary_path, "workers": workers}


@task(name="clean-shards", cache_policy=NONE)
def clean_task(shards: str, scores: str, out: str, rule: dict[str, Any], keep_unscored: bool,
               copy_samples: bool = True) -> dict:
    result = clean(shards, scores, out, Rule.from_dict(rule), keep_unscored=keep_unscored, copy=copy_samples)
    worker = worker_identity()
    return _summary(result, {name: f"{worker['host']}:{worker['pid']}" for name in result.written})


@task(name="plan-clean", cache_policy=NONE)
def plan_task(shards: str, scores: str, out: str, rule: dict[str, Any], keep_unscored: bool,
              copy_samples: bool = True) -> CleanPlan:
    return plan_clean(shards, scores, out, Rule.from_dict(rule), keep_unscored=keep_unscored, copy=copy_samples)


@task(name="shard-keys", cache_policy=NONE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def keys_task(shards: str, name: str) -> list[str]:
    return sample_keys(shards, name)


@task(name="clean-shard", cache_policy=NONE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def clean_shard_task(job: ShardJob, seen: dict[str, str]) -> dict:
    return {"marker": clean_shard(job, seen), "worker": worker_identity()}


@task(name="finish-clean", cache_policy=NONE)
def finish_task(plan: CleanPlan, markers: dict[str, dict]) -> CleanResult:
    return finish_clean(plan, markers)


def _clean_on(where, shards: str, scores: str, out: str, rule: dict[str, Any], keep_unscored: bool,
              copy_samples: bool = True) -> dict:
    """The clean steps shard by shard on a Dask runner; raises the first shard's error after all finished."""
    plan = plan_task(shards, scores, out, rule, keep_unscored, copy_samples)
    markers, workers = {}, {}
    if start_clean(plan) and plan.pending:
        names = [e.name for e in plan.manifest.shards]
        with ShardRunner(where) as pool:
            keys = pool.run([(keys_task.with_options(task_run_name=f"keys-{n}"), {"shards": plan.shards_dir,
                                                                                  "name": n}) for n in names])
            failed = next((k for k in keys if isinstance(k, BaseException)), None)
            if failed is not None:
                raise failed
            earlier = earlier_keys(plan, dict(zip(names, keys)))
            done = pool.run([(clean_shard_task.with_options(task_run_name=f"clean-{n}"),
                              {"job": plan.job(n), "seen": earlier[n]}) for n in plan.pending])
        failed = next((d for d in done if isinstance(d, BaseException)), None)
        if failed is not None:
            raise failed  # the shards that finished keep their markers: a rerun cleans only the rest
        markers = {n: d["marker"] for n, d in zip(plan.pending, done)}
        workers = {n: f"{d['worker']['host']}:{d['worker']['pid']}" for n, d in zip(plan.pending, done)}
    return _summary(finish_task(plan, markers), workers)


@task(name="write-report", cache_policy=NONE)
def report_task(scores: str, shards: str, out_html: str, rule: dict[str, Any], keep_unscored: bool,
                thumbnails: int = 24) -> str:
    # The Selection is rebuilt from the scores (one query) rather than passed between tasks as an Arrow table.
    selection = select(scores, Rule.from_dict(rule), keep_unscored=keep_unscored,
                       retired=read_manifest(shards).retired)
    return write_report(scores, shards, out_html, selection=selection, n_thumbs=thumbnails)


@flow(name="dede-clean")
def clean_flow(shards: str, scores: str, out: str, rule: dict[str, Any] | None = None, keep_unscored: bool = False,
               report: bool = True, report_path: str | None = None, runner: str = LOCAL,
               dask_workers: int | None = None, copy_samples: bool = True, thumbnails: int = 24) -> dict:
    """OUT/<shard>.tar minus what `rule` (Rule.to_dict(); default fpr 0.05) drops, OUT/rejected.parquet,
    summary.json, manifest.json (copy_samples=False: the verdicts only, rejected.parquet and summary.json); then
    the HTML report at report_path (default OUT/report.html, with `thumbnails` sample images) unless
    report=False. A rerun that cleans nothing new keeps an existing report. runner: local, dask or
    dask://HOST:PORT (flows/runners.py). Folders may be fsspec URLs. Returns counts, paths and workers
    (shard -> "host:pid" that cleaned it)."""
    rule = rule or DEFAULT_RULE.to_dict()
    where = parse_runner(runner, workers=dask_workers)
    if where.kind == LOCAL:
        result = clean_task(shards, scores, out, rule, keep_unscored, copy_samples)
    else:
        result = _clean_on(where, shards, scores, out, rule, keep_unscored, copy_samples)
    result["report"] = None
    if report:
        path = report_path or storage.join(storage.absolute(out), "report.html")
        result["report"] = path
        if result["written"] or not storage.isfile(path):
            report_task(scores, shards, path, rule, keep_unscored, thumbnails)
    return result
