"""What makes two clean runs the same, and claiming OUT for one: the run's identity, each shard's id (what its
cleaned output depends on), and the checks that the scores cover the shards. Part of the clean stage
(dede_core.stages.clean)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow.parquet as pq

from dede_core.io import storage
from dede_core.stages import folder
from dede_core.stages.select import Selection
from schemas import names
from schemas.manifest import Manifest, differences

FORMAT = "dede-clean/1"


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


def _shard_ids(identity: dict[str, Any], manifest: Manifest, scores_dir: str, sel: Selection) -> dict[str, str]:
    """shard -> sha256 of everything its cleaned output depends on: the run's identity, the shard's bytes, its
    scores file and the samples of it retired from the source; under an fdr rule also what it drops, since
    the verdict of each sample depends on the whole corpus. A marker with another id is cleaned again."""
    calibration = storage.join(scores_dir, names.CALIBRATION)
    common = [identity, _file_fingerprint(calibration) if storage.isfile(calibration) else None]
    retired: dict[str, list] = {}
    for r in manifest.retired:
        retired.setdefault(r["shard"], []).append([r["key"], r["reason"]])
    drops: dict[str, list] = {}
    if sel.verdict is not None:
        for key, shard, reason in zip(*(sel.dropped.column(c).to_pylist() for c in ("key", "shard", "reason"))):
            drops.setdefault(shard, []).append([key, reason])
    ids = {}
    for e in manifest.shards:
        scores = _file_fingerprint(storage.join(scores_dir, folder.stem(e.name) + ".parquet"))
        part = [common, e.name, e.digest, scores, sorted(retired.get(e.name, []))]
        if sel.verdict is not None:
            part.append(sorted(drops.get(e.name, [])))
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
