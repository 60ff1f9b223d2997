"""Write the cleaned corpus: every shard again, minus the dropped samples, kept samples copied byte for byte.

Kept members are copied as raw tar blocks (header and data), never decoded, so a kept sample is bit-identical to
the source's. Each shard is one job of the stage (dede_core.stages.protocol: CLEAN): temporary name, rename, then
OUT/_done/<stem>.rejected.parquet and the marker OUT/_done/<stem>.json last. The plan fixes which keys each shard
must drop as duplicates of an earlier shard's, so jobs run in any order or at once. Rerunning the same command
resumes; OUT/clean_config.json makes a rerun with another rule or other scores refuse. The folder ends with
rejected.parquet, summary.json and manifest.json (written last, in the shards folder format, so the cleaned corpus
can be scored again).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

import pyarrow.compute as pc

from dede_core.io import storage
from dede_core.io.tarspans import index_tar
from dede_core.stages.select import DEFAULT_RULE, Counts, Rule, Selection, select
from dede_core.stages import folder
from dede_core.stages.clean_finish import CleanResult, _finals, _finish, finish_clean  # noqa: F401 (re-exported)
from dede_core.stages.clean_identity import (FORMAT, LEGACY_IDENTITY, _check_coverage, _claim,  # noqa: F401
                                             _file_fingerprint, _identity, _score_setup, _shard_ids)
from dede_core.stages.clean_shard import ShardJob, clean_shard, finished_marker, rejected_table  # noqa: F401
from dede_core.stages.decisions import decided
from dede_core.stages.protocol import Placement, run_in_order
from schemas.manifest import Manifest, ShardEntry, read_manifest, read_spans


@dataclass(frozen=True)
class CleanPlan:
    """A clean run fixed before any shard is written: the selection, the claimed OUT, what is left to do."""

    shards_dir: str
    scores_dir: str
    out_dir: str
    selection: Selection
    manifest: Manifest
    config: dict[str, Any]  # identity and paths, as in clean_config.json
    shard_ids: dict[str, str]  # shard -> what its cleaned output depends on (_shard_ids)
    markers: dict[str, dict[str, Any] | None]  # shard -> marker of an earlier finished shard, None if pending
    copy: bool = True  # False: the verdicts only (rejected.parquet, summary.json), no cleaned shards
    earlier: dict[str, dict[str, str]] = field(default_factory=dict)  # pending shard -> its job's seen

    @property
    def pending(self) -> list[str]:
        return [e.name for e in self.manifest.shards if self.markers[e.name] is None]

    def jobs(self) -> list[ShardJob]:
        return [self.job(name) for name in self.pending]

    def job(self, name: str) -> ShardJob:
        entry = next(e for e in self.manifest.shards if e.name == name)
        dropped = self.selection.dropped.filter(pc.equal(self.selection.dropped.column("shard"), name))
        rows = zip(*(dropped.column(c).to_pylist() for c in ("key", "score", "reason")))
        return ShardJob(entry=entry, shards_dir=self.shards_dir, scores_dir=self.scores_dir, out_dir=self.out_dir,
                        dropped={key: (score, reason) for key, score, reason in rows},
                        keep_unscored=self.selection.keep_unscored,
                        unscored=self.selection.by_shard.get(name, Counts()).unscored,
                        identity_sha=self.shard_ids[name], copy=self.copy, seen=self.earlier.get(name, {}))

    def live_keys(self, name: str, keys: list[str]) -> list[str]:
        """A shard's keys less those retired from the source (they never count as duplicates)."""
        gone = {r["key"] for r in self.manifest.retired if r["shard"] == name}
        return [k for k in keys if k not in gone] if gone else keys


def plan_clean(shards_dir: str | os.PathLike, scores_dir: str | os.PathLike, out_dir: str | os.PathLike,
               rule: Rule = DEFAULT_RULE, *, keep_unscored: bool = False, copy: bool = True,
               neighbours: str | os.PathLike | None = None, decisions: str | None = None) -> CleanPlan:
    """Select, check the scores cover the shards, claim OUT (refusing other settings) and find the shards
    still to clean. Folders may be local paths or fsspec URLs. copy=False: write the verdicts only.
    neighbours: the neighbours stage's folder for an fdr rule (default: beside SCORES, when finished).
    decisions: a reviewer's decisions file (dede review), applied on top of the rule."""
    shards_dir, scores_dir, out_dir = (storage.absolute(p) for p in (shards_dir, scores_dir, out_dir))
    if storage.isdir(out_dir):
        folder.Markers(out_dir).sweep()  # left by a killed run; this run's tasks start later
    if out_dir in (shards_dir, scores_dir) or (
            not storage.is_url(out_dir) and os.path.realpath(out_dir) in (os.path.realpath(shards_dir),
                                                                          os.path.realpath(scores_dir))):
        raise ValueError(f"--out {out_dir} is the shards or scores folder; give a new folder for the cleaned shards")
    manifest = read_manifest(shards_dir)
    sel = select(scores_dir, rule, keep_unscored=keep_unscored, retired=manifest.retired, neighbours=neighbours)
    _check_coverage(manifest, sel, shards_dir, scores_dir)
    sel, reviewed = decided(sel, decisions)
    identity = _identity(sel, scores_dir) | ({} if copy else {"copy": False}) | reviewed
    config = {"identity": identity, "paths": {"shards_dir": shards_dir, "scores_dir": scores_dir}}
    _claim(out_dir, identity, config["paths"], [[e.name, e.digest] for e in manifest.shards])
    shard_ids = _shard_ids(identity, manifest, scores_dir, sel)
    markers = {e.name: finished_marker(out_dir, e.name, shard_ids[e.name], copy) for e in manifest.shards}
    return CleanPlan(shards_dir=shards_dir, scores_dir=scores_dir, out_dir=out_dir, selection=sel,
                     manifest=manifest, config=config, shard_ids=shard_ids, markers=markers, copy=copy)


def start_clean(plan: CleanPlan) -> CleanPlan:
    """The plan ready to run. When shards or final files are left to write, OUT/manifest.json is removed first
    (the folder is incomplete until every shard is done again) and each pending shard is given the keys an
    earlier shard holds: the duplicate-key check across shards, fixed before any shard is cleaned."""
    if not plan.pending and all(storage.isfile(p) for p in _finals(plan.out_dir, plan.copy)):
        return plan
    if storage.isfile(_finals(plan.out_dir)[2]):
        storage.unlink(_finals(plan.out_dir)[2])
    if not plan.pending:
        return plan
    order = [e.name for e in plan.manifest.shards]
    upto = plan.manifest.shards[:max(order.index(name) for name in plan.pending) + 1]  # later: no earlier keys
    keys = {e.name: sample_keys(plan.shards_dir, e) for e in upto}
    return dataclasses.replace(plan, earlier=earlier_keys(plan, keys))


def sample_keys(shards_dir: str, entry: ShardEntry) -> list[str]:
    """The sample keys of one shard, in order (the duplicate-key check across shards needs them): from the
    spans the shard stage recorded, else by reading the tar (downloaded first when SHARDS is a URL)."""
    recorded = read_spans(shards_dir, entry)
    if recorded is not None:
        return recorded.keys
    path = storage.join(shards_dir, entry.name)
    scratch = storage.scratch(shards_dir)
    try:
        return [s.key for s in index_tar(storage.local_copy(path, scratch.name if scratch else "")).samples]
    finally:
        if scratch:
            scratch.cleanup()


def earlier_keys(plan: CleanPlan, keys: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """For each pending shard, its keys that an earlier shard (manifest order) already holds -> that shard:
    what a sequential clean would have in `seen` for it. keys: sample_keys of the shards up to the last
    pending one."""
    first: dict[str, str] = {}
    out: dict[str, dict[str, str]] = {}
    for entry in plan.manifest.shards:
        if entry.name not in keys:
            break
        live = plan.live_keys(entry.name, keys[entry.name])
        if plan.markers[entry.name] is None:
            out[entry.name] = {k: first[k] for k in live if k in first}
        for key in live:
            first.setdefault(key, entry.name)
    return out


@dataclass(frozen=True)
class CleanSettings:
    """How a corpus is cleaned, apart from which folders: the clean stage's settings."""

    rule: Rule = DEFAULT_RULE  # what is dropped (dede_core.stages.select)
    keep_unscored: bool = False  # keep samples without a score instead of dropping them
    copy: bool = True  # False: the verdicts only (rejected.parquet, summary.json), no cleaned shards
    neighbours: str | None = None  # the neighbours folder an fdr rule reads; None: beside SCORES, when finished
    decisions: str | None = None  # a reviewer's decisions file (dede review), applied on top of the rule


@dataclass(frozen=True)
class CleanRun:
    """One run of the clean stage: its folders and settings (what CLEAN.plan takes)."""

    shards: str  # shards folder written by the shard stage
    scores: str  # scores folder of those shards
    out: str  # new (or this run's) folder for the cleaned shards
    settings: CleanSettings = field(default_factory=CleanSettings)


class CleanStage:
    """The clean stage's four steps (dede_core.stages.protocol); a job is one shard."""

    name, unit = "clean", "shards"

    def plan(self, run: CleanRun) -> CleanPlan:
        s = run.settings
        return start_clean(plan_clean(run.shards, run.scores, run.out, s.rule, keep_unscored=s.keep_unscored,
                                      copy=s.copy, neighbours=s.neighbours, decisions=s.decisions))

    def job_name(self, job: ShardJob) -> str:
        return job.entry.name

    def place(self, job: ShardJob, where: Placement) -> ShardJob:
        return job  # copies bytes: runs the same anywhere

    def run_job(self, job: ShardJob) -> dict[str, Any]:
        return clean_shard(job)

    def finish(self, plan: CleanPlan, markers: Mapping[str, dict[str, Any]],
               errors: Mapping[str, BaseException]) -> CleanResult:
        """The final files, once every shard is cleaned; else the first failed shard's error (the shards that
        finished keep their markers: a rerun cleans only the rest)."""
        for exc in errors.values():
            raise exc
        return finish_clean(plan, dict(markers))


CLEAN = CleanStage()


def clean(shards_dir: str | os.PathLike, scores_dir: str | os.PathLike, out_dir: str | os.PathLike,
          rule: Rule = DEFAULT_RULE, *, keep_unscored: bool = False, progress: bool = True,
          copy: bool = True, neighbours: str | os.PathLike | None = None,
          decisions: str | os.PathLike | None = None) -> CleanResult:
    """Write OUT/<shard>.tar with the samples the rule keeps, OUT/rejected.parquet, summary.json, manifest.json:
    the clean stage's steps in this process, one shard after the other. Rerunning the same command resumes or
    does nothing; other settings into the same OUT are refused. copy=False writes only the verdicts
    (rejected.parquet, summary.json): no shard is copied and there is no manifest.json. decisions: a reviewer's
    decisions file (dede review) applied on top of the rule."""
    run = CleanRun(os.fspath(shards_dir), os.fspath(scores_dir), os.fspath(out_dir),
                   CleanSettings(rule, keep_unscored, copy, None if neighbours is None else os.fspath(neighbours),
                                 None if decisions is None else os.fspath(decisions)))
    return run_in_order(CLEAN, run, progress=progress)
