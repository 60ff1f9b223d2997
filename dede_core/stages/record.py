"""The record of one sanitize run, RUN/sanitize.json: config, package versions, detector hash, counts, timings.

Counts are read back from the stage folders (shards manifest, scores, clean summary), not from what one call
did, so the record describes the outputs on disk. Timings and per-call work are volatile: a rerun that changes
nothing else leaves the file as it is, so a run that did no new work leaves identical outputs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import time
from datetime import datetime, timezone
from typing import Any, Iterator

from dede_core.detector.health import describe_health
from dede_core.signals.verdict import describe
from dede_core.io import storage
from schemas.manifest import read_manifest

FORMAT = "dede-sanitize/1"
PACKAGES = ("dede", "torch", "prefect", "duckdb", "pyarrow", "webdataset", "timm")
VOLATILE = ("written", "timings", "work")  # left out when deciding whether a rerun changed the record


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """{distribution: installed version, or None when it is not installed}."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class StageTimer:
    """Wall-clock seconds per named stage: `with timer.stage("score"): ...`; `timer.seconds` is JSON-able."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def score_counts(scores_dir: str | os.PathLike) -> dict[str, int]:
    """Rows of the scores folder by status: {'rows', 'ok', 'decode_error', 'read_error'}."""
    from dede_core.sql import connect, run_query
    from schemas.tables import STATUS_DECODE_ERROR, STATUS_OK, STATUS_READ_ERROR, STATUS_SKIPPED

    conn = connect(scores_dir)
    try:
        table = run_query(conn, "SELECT status, count(*) AS n FROM scores GROUP BY status")
    finally:
        conn.close()
    by_status = dict(zip(table.column("status").to_pylist(), table.column("n").to_pylist()))
    counts = {"rows": sum(by_status.values())}
    statuses = (STATUS_OK, STATUS_DECODE_ERROR, STATUS_READ_ERROR, STATUS_SKIPPED)
    counts.update({s: int(by_status.get(s, 0)) for s in statuses})
    return counts


def detector_facts(path: str | os.PathLike) -> dict[str, Any]:
    """Content hash, encoder and training length of a detector checkpoint (verified on load)."""
    from dede_core.detector.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    return {"path": os.path.abspath(os.fspath(path)), "hash": ckpt.content_hash, "encoder_spec": ckpt.encoder_spec,
            "encoder_fingerprint": ckpt.encoder_fingerprint, "epoch": ckpt.meta.get("epoch"),
            "stopped": ckpt.meta.get("stopped"), "health": ckpt.meta.get("health"), "config": ckpt.config.to_dict()}


def collect(*, config: dict[str, Any], paths: dict[str, str], timings: dict[str, float] | None = None,
            work: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run record from the finished stage folders. paths: shards, detector (file), scores, clean, report."""
    manifest = read_manifest(paths["shards"])
    with open(os.path.join(paths["clean"], "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    return {
        "format": FORMAT,
        "config": config,
        "versions": package_versions(),
        "detector": detector_facts(paths["detector"]),
        "outputs": {name: os.path.abspath(path) for name, path in paths.items()},
        "counts": {"samples": manifest.samples, "shards": len(manifest.shards),
                   "not_sharded": len(manifest.skipped), "retired": len(manifest.retired),
                   "scores": score_counts(paths["scores"]),
                   "clean": summary["counts"]},
        "selection": {"rule": summary["rule_text"], "threshold": summary["threshold"], "how": summary["how"],
                      "keep_unscored": summary["keep_unscored"], "verdict": summary.get("verdict"),
                      "decisions": summary.get("decisions")},  # what a reviewer's decisions changed (dede review)
        "timings": dict(timings or {}),  # seconds per stage of the run that last changed this record
        "work": dict(work or {}),  # what each stage did in that run (e.g. shards scored vs. already done)
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read(path: str | os.PathLike) -> dict[str, Any]:
    """An existing run record."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def work_text(work: dict[str, Any]) -> str:
    """One line: what this run found in the source and the work each stage did."""
    sh, sc, cl = work.get("shard", {}), work.get("score", {}), work.get("clean", {})
    return (f"source: {sh.get('added', 0)} added, {sh.get('changed', 0)} changed, {sh.get('removed', 0)} removed, "
            f"{sh.get('unchanged', 0)} unchanged; {len(sh.get('new_shards', []))} new shard(s); scored "
            f"{sc.get('scored', 0)} shard(s) ({sc.get('already_done', 0)} already done); cleaned "
            f"{cl.get('written', 0)} shard(s) ({cl.get('already_done', 0)} unchanged)")


def _stable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def write(path: str | os.PathLike, record: dict[str, Any]) -> bool:
    """Write the record atomically; returns False (and leaves the file) when only volatile fields differ."""
    path = os.fspath(path)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except ValueError:
            old = None
        # Compare as JSON would store them (tuples become lists).
        if old is not None and _stable(old) == _stable(json.loads(json.dumps(record))):
            return False
    storage.write_json(path, record)
    return True


def markdown(record: dict[str, Any], work: dict[str, Any] | None = None) -> str:
    """A short Markdown summary of a run record (for a Prefect artifact or a terminal); `work`: this run's
    findings and work (the record keeps those of the run that last changed the outputs)."""
    counts, sel, out = record["counts"], record["selection"], record["outputs"]
    clean, scores = counts["clean"], counts["scores"]
    threshold = ("none (the combined verdict)" if sel.get("verdict") else "none (SQL predicate)"
                 if sel["threshold"] is None else f"{sel['threshold']:.6g}")
    lines = [
        "# dede sanitize",
        "",
        "| samples | shards | scored ok | undecodable | unreadable | kept | dropped |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {counts['samples']} | {counts['shards']} | {scores['ok']} | {scores['decode_error']} | "
        f"{scores['read_error']} | {clean['kept']} | {clean['dropped']} |",
        "",
        f"**Rule** `{sel['rule']}`, threshold **{threshold}**",
        "",
        *([f"- {line}" for line in describe(sel["verdict"])] if sel.get("verdict") else [sel["how"]]),
        "",
        f"Detector `{record['detector']['hash'][:16]}` ({record['detector']['encoder_spec']}); "
        f"{describe_health(record['detector'].get('health'))}",
        "",
        "| output | path |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | `{path}` |" for name, path in out.items()]
    lines += ["", f"**This run** {work_text(work if work is not None else record.get('work', {}))}"]
    if record.get("timings"):
        lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in record["timings"].items())]
    return "\n".join(lines) + "\n"
