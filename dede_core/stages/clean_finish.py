"""The end of a clean run: rejected.parquet, summary.json, then manifest.json last (a folder with a manifest is
complete). Part of the clean stage (dede_core.stages.clean)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from dede_core.io import storage
from dede_core.stages import folder
from dede_core.stages.clean_shard import rejected_table
from dede_core.stages.select import Counts, Selection
from schemas import names
from schemas.manifest import Manifest, ShardEntry, write_manifest
from schemas.tables import REJECTED, conform, with_metadata

if TYPE_CHECKING:
    from dede_core.stages.clean import CleanPlan


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


def _finals(out_dir: str, copy: bool = True) -> list[str]:
    """The files a finished clean folder holds, manifest.json (of the cleaned shards) last."""
    kinds = (names.REJECTED, names.SUMMARY, names.MANIFEST) if copy else (names.REJECTED, names.SUMMARY)
    return [storage.join(out_dir, n) for n in kinds]


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
    if sel.verdict is not None:  # every scored sample's p-values, for `dede sql`, the report and the review
        storage.write_parquet(storage.join(out_dir, names.VERDICT), sel.verdict.table)
    by_shard = {m["shard"]: m["counts"] for m in markers}
    total = sum((Counts(**c) for c in by_shard.values()), Counts())
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary = {"format": "dede-clean-summary/1", "created": now, **sel.to_dict(), "counts": total.to_dict(),
               "shards": by_shard, "copied": copy, **config["paths"],
               "decisions": config["identity"].get("decisions")}  # what a reviewer's decisions changed
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
