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
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dede_core.io import storage
from dede_core.io.tarspans import index_tar
from dede_core.stages.select import DEFAULT_RULE, Counts, Rule, Selection, select
from dede_core.stages import folder
from dede_core.stages.clean_shard import ShardJob, clean_shard, finished_marker, rejected_table
from dede_core.stages.protocol import Placement, run_in_order
from schemas import names
from schemas.manifest import Manifest, ShardEntry, differences, read_manifest, read_spans, write_manifest
from schemas.tables import REJECTED, conform, with_metadata

FORMAT = "dede-clean/1"


@dataclass(frozen=True)
class CleanResult:
    """What clean wrote (or found already written) in out_dir."""

    out_dir: str
    selection: Selection
    counts: Counts  # over every sample of the shards: total = kept + dropped
    by_shard: dict[str, Counts]
    written: list[str]  # shards cleaned by this call
    skipped: list[str]  # shards already complete from an earlier call

    @property
    def rejected_path(self) -> str:
        return os.path.join(self.out_dir, names.REJECTED)

    @property
    def summary_path(self) -> str:
        return os.path.join(self.out_dir, names.SUMMARY)


def _file_fingerprint(path: str) -> list[Any]:
    """[name, size, rows, run config] of a scores file: changes when it is rescored."""
    with storage.open_read(path) as f:
        meta = pq.read_metadata(f)
    config = (meta.metadata or {}).get(b"dede.config", b"").decode("utf-8", "replace")
    return [storage.basename(path), storage.getsize(path), meta.num_rows, config]


def _score_setup(scores_dir: str) -> dict[str, Any] | None:
    """The scores folder's run.json (what every score depends on) less its shard list, which may grow."""
    path = storage.join(scores_dir, "run.json")
    if not storage.isfile(path):
        return None
    return {k: v for k, v in storage.read_json(path).items() if k not in ("shards", "dede_version")}


def _identity(sel: Selection, scores_dir: str) -> dict[str, Any]:
    """What makes two clean runs the same; paths are left out so moved folders still resume. The shards and
    scores are not in it: a grown corpus (more shards, more scores) is cleaned into the same OUT, and each
    shard's marker says which shard, scores and retired samples it was cleaned from (_shard_ids)."""
    return {"format": FORMAT, "rule": sel.rule.to_dict(), "keep_unscored": sel.keep_unscored,
            "threshold": sel.threshold, "detector_hash": sel.detector_hash, "encoder_id": sel.encoder_id,
            "score_setup": _score_setup(scores_dir)}


def _shard_ids(identity: dict[str, Any], manifest: Manifest, scores_dir: str) -> dict[str, str]:
    """shard -> sha256 of everything its cleaned output depends on: the run's identity, the shard's bytes, its
    scores file and the samples of it retired from the source. A marker with another id is cleaned again."""
    calibration = storage.join(scores_dir, names.CALIBRATION)
    common = [identity, _file_fingerprint(calibration) if storage.isfile(calibration) else None]
    retired: dict[str, list] = {}
    for r in manifest.retired:
        retired.setdefault(r["shard"], []).append([r["key"], r["reason"]])
    ids = {}
    for e in manifest.shards:
        scores = _file_fingerprint(storage.join(scores_dir, folder.stem(e.name) + ".parquet"))
        part = [common, e.name, e.digest, scores, sorted(retired.get(e.name, []))]
        ids[e.name] = hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()
    return ids


LEGACY_IDENTITY = ("scores", "shards")  # in the identity of clean folders made before shards could be added


def _claim(out_dir: str, identity: dict[str, Any], paths: dict[str, str], shards: list[list[str]]) -> None:
    """Make OUT ours: new or empty, or holding a clean run with the same identity of the same shards (the
    shard list may have grown at its end: a corpus updated by `dede shard`)."""

    def check(old: dict[str, Any]) -> bool:
        had = {k: v for k, v in old.get("identity", {}).items() if k not in LEGACY_IDENTITY}
        diffs = differences(had, identity if "score_setup" in had else
                            {k: v for k, v in identity.items() if k != "score_setup"})
        moved = identity["rule"]["kind"] == "quantile" and all(d.startswith("threshold") for d in diffs)
        folder.refuse(out_dir, "a clean run", diffs, "a quantile threshold moves when the corpus changes: use "
                      "--fpr or --threshold for a corpus cleaned again as it grows; " if moved else "")
        before = old.get("shards")
        if before is None and "shards" in old.get("identity", {}):  # a folder made before shards could be added
            if hashlib.sha256(json.dumps(shards).encode()).hexdigest() != old["identity"]["shards"]:
                raise ValueError(f"{out_dir} was cleaned from other shards; clean into a new folder, or delete "
                                 f"{out_dir} first")
        elif before is not None and shards[:len(before)] != before:
            raise ValueError(f"{out_dir} was cleaned from other shards (its shard list is not the start of this "
                             f"one); clean into a new folder, or delete {out_dir} first")
        return before != shards

    folder.claim(out_dir, names.CLEAN_CONFIG, {"identity": identity, "paths": paths, "shards": shards}, check=check)


def _check_coverage(manifest: Manifest, sel: Selection, shards_dir: str, scores_dir: str) -> None:
    shard_names = {e.name for e in manifest.shards}
    foreign = sorted(set(sel.by_shard) - shard_names)
    if foreign:
        raise ValueError(f"{scores_dir} scores shard(s) {', '.join(foreign[:5])} that {shards_dir}/manifest.json "
                         f"does not list: these scores belong to another corpus")
    missing = [e.name for e in manifest.shards
               if not storage.isfile(storage.join(scores_dir, folder.stem(e.name) + ".parquet"))]
    if missing:
        scorer = folder.Markers(scores_dir)  # the scorer records the shards it could not read
        failed = [e for e in (scorer.failure(n) for n in missing) if e is not None]
        why = f"; the scorer could not read {len(failed)} of them, e.g. {failed[0]}" if failed else ""
        raise ValueError(f"no scores for {len(missing)} shard(s) ({', '.join(missing[:5])}): expected "
                         f"{scores_dir}/<stem>.parquet for each{why}; finish scoring (rerun `dede score`) first")


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
               rule: Rule = DEFAULT_RULE, *, keep_unscored: bool = False, copy: bool = True) -> CleanPlan:
    """Select, check the scores cover the shards, claim OUT (refusing other settings) and find the shards
    still to clean. Folders may be local paths or fsspec URLs. copy=False: write the verdicts only."""
    shards_dir, scores_dir, out_dir = (storage.absolute(p) for p in (shards_dir, scores_dir, out_dir))
    if storage.isdir(out_dir):
        folder.Markers(out_dir).sweep()  # left by a killed run; this run's tasks start later
    if out_dir in (shards_dir, scores_dir) or (
            not storage.is_url(out_dir) and os.path.realpath(out_dir) in (os.path.realpath(shards_dir),
                                                                          os.path.realpath(scores_dir))):
        raise ValueError(f"--out {out_dir} is the shards or scores folder; give a new folder for the cleaned shards")
    manifest = read_manifest(shards_dir)
    sel = select(scores_dir, rule, keep_unscored=keep_unscored, retired=manifest.retired)
    _check_coverage(manifest, sel, shards_dir, scores_dir)
    identity = _identity(sel, scores_dir) | ({} if copy else {"copy": False})
    config = {"identity": identity, "paths": {"shards_dir": shards_dir, "scores_dir": scores_dir}}
    _claim(out_dir, identity, config["paths"], [[e.name, e.digest] for e in manifest.shards])
    shard_ids = _shard_ids(identity, manifest, scores_dir)
    markers = {e.name: finished_marker(out_dir, e.name, shard_ids[e.name], copy) for e in manifest.shards}
    return CleanPlan(shards_dir=shards_dir, scores_dir=scores_dir, out_dir=out_dir, selection=sel,
                     manifest=manifest, config=config, shard_ids=shard_ids, markers=markers, copy=copy)


def _finals(out_dir: str, copy: bool = True) -> list[str]:
    """The files a finished clean folder holds, manifest.json (of the cleaned shards) last."""
    kinds = (names.REJECTED, names.SUMMARY, names.MANIFEST) if copy else (names.REJECTED, names.SUMMARY)
    return [storage.join(out_dir, n) for n in kinds]


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


def finish_clean(plan: CleanPlan, markers: dict[str, dict[str, Any]]) -> CleanResult:
    """rejected.parquet, summary.json, then manifest.json last (a folder with a manifest is complete); markers:
    shard -> marker of every shard cleaned since the plan was made."""
    written = [e.name for e in plan.manifest.shards if plan.markers[e.name] is None]
    done = {e.name: plan.markers[e.name] or markers[e.name] for e in plan.manifest.shards}
    if written or not all(storage.isfile(p) for p in _finals(plan.out_dir, plan.copy)):
        _finish(plan.out_dir, plan.selection, plan.manifest, [done[e.name] for e in plan.manifest.shards],
                plan.config, plan.copy)
    by_shard = {name: Counts(**m["counts"]) for name, m in done.items()}
    return CleanResult(out_dir=plan.out_dir, selection=plan.selection, counts=sum(by_shard.values(), Counts()),
                       by_shard=by_shard, written=written,
                       skipped=[e.name for e in plan.manifest.shards if e.name not in set(written)])


def _finish(out_dir: str, sel: Selection, manifest: Manifest, markers: list[dict[str, Any]],
            config: dict[str, Any], copy: bool = True) -> None:
    parts = []
    for m in markers:
        with storage.open_read(folder.Markers(out_dir).path(m["shard"], ".rejected.parquet")) as f:
            parts.append(conform(pq.read_table(f), REJECTED))  # a part written before `source` existed
    meta = with_metadata(REJECTED, "rejected", json.dumps(config, sort_keys=True)).metadata
    meta.update({b"dede.rule": sel.rule.label.encode(), b"dede.threshold": json.dumps(sel.threshold).encode()})
    rejected = pa.concat_tables(parts).cast(REJECTED) if parts else rejected_table([])
    storage.write_parquet(storage.join(out_dir, names.REJECTED), rejected.replace_schema_metadata(meta))
    by_shard = {m["shard"]: m["counts"] for m in markers}
    total = sum((Counts(**c) for c in by_shard.values()), Counts())
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary = {"format": "dede-clean-summary/1", "created": now, **sel.to_dict(), "counts": total.to_dict(),
               "shards": by_shard, "copied": copy, **config["paths"]}
    storage.write_json(storage.join(out_dir, names.SUMMARY), summary)
    if not copy:
        return
    # A marker of a clean begun before issue #22 (a resumed run) records sha256; later ones BLAKE3.
    entries = [ShardEntry(name=m["shard"], samples=m["samples"], bytes=m["bytes"], sha256=m.get("sha256"),
                          blake3=m.get("blake3"), first_key=m["first_key"], last_key=m["last_key"]) for m in markers]
    write_manifest(out_dir, Manifest(
        source=config["paths"]["shards_dir"], samples_per_shard=manifest.samples_per_shard, created=now,
        shards=entries, samples=sum(e.samples for e in entries), classes=manifest.classes,
        options={"cleaned_with": sel.rule.label, "threshold": sel.threshold, "keep_unscored": sel.keep_unscored}))


@dataclass(frozen=True)
class CleanSettings:
    """How a corpus is cleaned, apart from which folders: the clean stage's settings."""

    rule: Rule = DEFAULT_RULE  # what is dropped (dede_core.stages.select)
    keep_unscored: bool = False  # keep samples without a score instead of dropping them
    copy: bool = True  # False: the verdicts only (rejected.parquet, summary.json), no cleaned shards


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
                                      copy=s.copy))

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
          copy: bool = True) -> CleanResult:
    """Write OUT/<shard>.tar with the samples the rule keeps, OUT/rejected.parquet, summary.json, manifest.json:
    the clean stage's steps in this process, one shard after the other. Rerunning the same command resumes or
    does nothing; other settings into the same OUT are refused. copy=False writes only the verdicts
    (rejected.parquet, summary.json): no shard is copied and there is no manifest.json."""
    run = CleanRun(os.fspath(shards_dir), os.fspath(scores_dir), os.fspath(out_dir),
                   CleanSettings(rule, keep_unscored, copy))
    return run_in_order(CLEAN, run, progress=progress)
