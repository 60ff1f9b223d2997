"""Write the cleaned corpus: every shard again, minus the dropped samples, kept samples copied byte for byte.

Kept members are copied as raw tar blocks (header and data), never decoded, so a kept sample is bit-identical to
the source's. One shard at a time: temporary name, rename, then OUT/_done/<stem>.rejected.parquet and the marker
OUT/_done/<stem>.json last. Rerunning the same command resumes; OUT/clean_config.json makes a rerun with another
rule or other scores refuse. The folder ends with rejected.parquet, summary.json and manifest.json (written last,
in the shards folder format, so the cleaned corpus can be scored again).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from dede_core.progress import Progress
from dede_core.select import DEFAULT_RULE, Counts, Rule, Selection, select
from dede_core.sources import clean_key, group_members  # the scorer's key rule, so keys match the scores
from dede_core.sql import CALIBRATION_NAME, scores_files
from schemas.manifest import Manifest, ShardEntry, differences, read_manifest, write_json_atomic, write_manifest
from schemas.tables import REJECTED, with_metadata

FORMAT = "dede-clean/1"
CONFIG_NAME = "clean_config.json"
DONE_DIR = "_done"
REJECTED_NAME = "rejected.parquet"
SUMMARY_NAME = "summary.json"
MANIFEST_NAME = "manifest.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class TarSample:
    key: str
    spans: list[tuple[int, int]]  # [start, end) of each member: its header blocks and its padded data


@dataclass
class TarIndex:
    samples: list[TarSample] = field(default_factory=list)
    others: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of members that are no sample
    gaps: list[tuple[int, int]] = field(default_factory=list)  # archive-level blocks (pax global headers): kept


def _member_end(m: tarfile.TarInfo) -> int:
    has_data = m.isreg() or m.type not in tarfile.SUPPORTED_TYPES  # the same test tarfile uses to skip data
    return m.offset_data + (-(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if has_data else 0)


def index_tar(path: str) -> TarIndex:
    """Samples of a WebDataset tar as byte spans, grouped as the scorer's source groups them."""
    index = TarIndex()

    def tracked(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        """Every member, noting the archive-level blocks between them (pax global headers) as gaps."""
        prev_end = 0
        for m in tar:
            if m.offset > prev_end:
                index.gaps.append((prev_end, m.offset))
            prev_end = _member_end(m)
            yield m

    def skip(m: tarfile.TarInfo, why: str) -> None:
        index.others.append((clean_key(m.name), f"not a sample: member {m.name!r} {why}"))

    try:
        with tarfile.open(path, mode="r:") as tar:
            for key, group in group_members(tracked(tar), skip):
                index.samples.append(TarSample(clean_key(key), [(m.offset, _member_end(m)) for m in group.values()]))
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{path} is not a readable uncompressed tar shard: {e}") from None
    return index


def _pump(src: BinaryIO, n: int, digest: Any, dst: BinaryIO | None, path: str) -> None:
    while n > 0:
        block = src.read(min(CHUNK, n))
        if not block:
            raise ValueError(f"{path} ended early: the shard changed while it was read; rerun")
        digest.update(block)
        if dst is not None:
            dst.write(block)
        n -= len(block)


def _copy_spans(path: str, size: int, spans: list[tuple[int, int]], dst: BinaryIO) -> tuple[str, int, str]:
    """Copy sorted byte spans of `path` into a new tar at dst, in one sequential read that also hashes the
    whole source; returns (source sha256, bytes written, written sha256)."""
    src_hash, out_hash = hashlib.sha256(), hashlib.sha256()

    class Out:  # hash what is written, without a second read
        def write(self, data: bytes) -> None:
            out_hash.update(data)
            dst.write(data)

    out, pos, written = Out(), 0, 0
    with open(path, "rb") as src:
        for start, end in spans:
            _pump(src, start - pos, src_hash, None, path)
            _pump(src, end - start, src_hash, out, path)
            pos, written = end, written + end - start
        _pump(src, size - pos, src_hash, None, path)
        if src.read(1):
            raise ValueError(f"{path} grew while it was read; rerun")
    # End of archive as tarfile writes it: two zero blocks, padded to a whole record.
    trailer = 2 * tarfile.BLOCKSIZE
    trailer += -(written + trailer) % tarfile.RECORDSIZE
    out.write(bytes(trailer))
    return src_hash.hexdigest(), written + trailer, out_hash.hexdigest()


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


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
        return os.path.join(self.out_dir, REJECTED_NAME)

    @property
    def summary_path(self) -> str:
        return os.path.join(self.out_dir, SUMMARY_NAME)


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _scores_fingerprint(scores_dir: str) -> str:
    """sha256 over each scores file's name, size, rows and run config: changes when anything is rescored."""
    paths = scores_files(scores_dir)
    calibration = os.path.join(scores_dir, CALIBRATION_NAME)
    paths += [calibration] if os.path.isfile(calibration) else []
    digest = hashlib.sha256()
    for path in paths:
        meta = pq.read_metadata(path)
        config = (meta.metadata or {}).get(b"dede.config", b"").decode("utf-8", "replace")
        digest.update(json.dumps([os.path.basename(path), os.path.getsize(path), meta.num_rows, config]).encode())
    return digest.hexdigest()


def _identity(sel: Selection, manifest: Manifest, scores_dir: str) -> dict[str, Any]:
    """What makes two clean runs the same; paths are left out so moved folders still resume."""
    shards = json.dumps([[e.name, e.sha256] for e in manifest.shards]).encode()
    return {"format": FORMAT, "rule": sel.rule.to_dict(), "keep_unscored": sel.keep_unscored,
            "threshold": sel.threshold, "detector_hash": sel.detector_hash, "encoder_id": sel.encoder_id,
            "scores": _scores_fingerprint(scores_dir), "shards": hashlib.sha256(shards).hexdigest()}


def _claim(out_dir: str, identity: dict[str, Any], paths: dict[str, str]) -> None:
    """Make OUT ours: new or empty, or holding a clean run with the same identity."""
    config_path = os.path.join(out_dir, CONFIG_NAME)
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            diffs = differences(json.load(f).get("identity", {}), identity)
        if diffs:
            raise ValueError(f"{out_dir} was cleaned with other settings ({'; '.join(diffs)}); clean into a new "
                             f"folder, or delete {out_dir} first")
        return
    # A run killed while writing clean_config.json leaves only its temporary file: that folder is still ours.
    if os.path.isdir(out_dir) and [n for n in os.listdir(out_dir) if not n.startswith(f".{CONFIG_NAME}.")]:
        raise ValueError(f"{out_dir} is not empty and holds no dede clean run (no {CONFIG_NAME}); "
                         f"choose a new or empty folder")
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(config_path, {"identity": identity, "paths": paths})


def _check_coverage(manifest: Manifest, sel: Selection, shards_dir: str, scores_dir: str) -> None:
    names = {e.name for e in manifest.shards}
    foreign = sorted(set(sel.by_shard) - names)
    if foreign:
        raise ValueError(f"{scores_dir} scores shard(s) {', '.join(foreign[:5])} that {shards_dir}/manifest.json "
                         f"does not list: these scores belong to another corpus")
    missing = [e.name for e in manifest.shards
               if not os.path.isfile(os.path.join(scores_dir, _stem(e.name) + ".parquet"))]
    if missing:
        failed = []  # the scorer records shards it could not read in _failed/
        for path in (os.path.join(scores_dir, "_failed", _stem(n) + ".json") for n in missing):
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    failed.append(json.load(f).get("error", ""))
        why = f"; the scorer could not read {len(failed)} of them, e.g. {failed[0]}" if failed else ""
        raise ValueError(f"no scores for {len(missing)} shard(s) ({', '.join(missing[:5])}): expected "
                         f"{scores_dir}/<stem>.parquet for each{why}; finish scoring (rerun `dede score`) first")


def _write_parquet(table: pa.Table, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _rejected_table(rows: list[tuple[str, str, float | None, str]]) -> pa.Table:
    columns = list(zip(*rows)) if rows else [[], [], [], []]
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, REJECTED)], schema=REJECTED)


def _scored_keys(scores_dir: str, name: str) -> set[str]:
    path = os.path.join(scores_dir, _stem(name) + ".parquet")
    table = pq.read_table(path, columns=["key", "shard"])
    others = set(table.column("shard").to_pylist()) - {name}
    if others:
        raise ValueError(f"{path} holds rows of shard(s) {sorted(others)[:3]}, not only {name}; rescore")
    return set(table.column("key").to_pylist())


def _clean_shard(entry: ShardEntry, shards_dir: str, out_dir: str, *, scored: set[str],
                 dropped: dict[str, tuple[float | None, str]], keep_unscored: bool, seen: dict[str, str],
                 unscored: int) -> dict[str, Any]:
    """Write OUT/<name> holding the kept samples; return the marker (counts, bytes, sha256, rejected rows)."""
    name, src = entry.name, os.path.join(shards_dir, entry.name)
    if not os.path.isfile(src) or os.path.getsize(src) != entry.bytes:
        raise ValueError(f"{src} is missing or not the {entry.bytes} bytes its manifest says; reshard")
    index = index_tar(src)
    kept, rows = [], []
    for s in index.samples:
        if s.key in seen:
            rows.append((s.key, name, None, f"duplicate key (first seen in {seen[s.key]})"))
            continue
        seen[s.key] = name
        if s.key in dropped:
            rows.append((s.key, name, *dropped[s.key]))
        elif s.key in scored or keep_unscored:
            kept.append(s)
            unscored += s.key not in scored
        else:
            rows.append((s.key, name, None, "not scored"))
            unscored += 1
    rows += [(key, name, None, reason) for key, reason in index.others]
    stray = scored - {s.key for s in index.samples}
    if stray:
        raise ValueError(f"the scores of {name} hold {len(stray)} key(s) that {src} does not (e.g. "
                         f"{sorted(stray)[:3]}): the scores belong to another corpus; rescore these shards")

    spans = _merge(index.gaps + [span for s in kept for span in s.spans])
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            src_sha, size, sha = _copy_spans(src, entry.bytes, spans, f)
            f.flush()
            os.fsync(f.fileno())
        if src_sha != entry.sha256:
            raise ValueError(f"{src} does not match the sha256 in its manifest; the shard changed: reshard")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a corpus is meant to be read by others
        os.replace(tmp, os.path.join(out_dir, name))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _write_parquet(_rejected_table(rows), os.path.join(out_dir, DONE_DIR, _stem(name) + ".rejected.parquet"))
    counts = Counts(total=len(kept) + len(rows), kept=len(kept), dropped=len(rows), unscored=unscored)
    return {"shard": name, "bytes": size, "sha256": sha, "samples": len(kept), "counts": counts.to_dict(),
            "first_key": kept[0].key if kept else "", "last_key": kept[-1].key if kept else ""}


def _marker(out_dir: str, name: str, identity_sha: str) -> dict[str, Any] | None:
    """The marker of a finished shard of this run, or None when the shard must be (re)written."""
    path = os.path.join(out_dir, DONE_DIR, _stem(name) + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    out = os.path.join(out_dir, name)
    part = os.path.join(out_dir, DONE_DIR, _stem(name) + ".rejected.parquet")
    ok = (marker.get("identity") == identity_sha and os.path.isfile(part) and os.path.isfile(out)
          and os.path.getsize(out) == marker.get("bytes"))
    return marker if ok else None


def _finish(out_dir: str, sel: Selection, manifest: Manifest, markers: list[dict[str, Any]],
            config: dict[str, Any]) -> None:
    """rejected.parquet, summary.json, then manifest.json last: a folder with a manifest is complete."""
    parts = [pq.read_table(os.path.join(out_dir, DONE_DIR, _stem(m["shard"]) + ".rejected.parquet"))
             for m in markers]
    meta = with_metadata(REJECTED, "rejected", json.dumps(config, sort_keys=True)).metadata
    meta.update({b"dede.rule": sel.rule.label.encode(), b"dede.threshold": json.dumps(sel.threshold).encode()})
    rejected = pa.concat_tables(parts).cast(REJECTED) if parts else _rejected_table([])
    _write_parquet(rejected.replace_schema_metadata(meta), os.path.join(out_dir, REJECTED_NAME))
    by_shard = {m["shard"]: m["counts"] for m in markers}
    total = sum((Counts(**c) for c in by_shard.values()), Counts())
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    summary = {"format": "dede-clean-summary/1", "created": now, **sel.to_dict(), "counts": total.to_dict(),
               "shards": by_shard, **config["paths"]}
    write_json_atomic(os.path.join(out_dir, SUMMARY_NAME), summary)
    entries = [ShardEntry(name=m["shard"], samples=m["samples"], bytes=m["bytes"], sha256=m["sha256"],
                          first_key=m["first_key"], last_key=m["last_key"]) for m in markers]
    write_manifest(out_dir, Manifest(
        source=config["paths"]["shards_dir"], samples_per_shard=manifest.samples_per_shard, created=now,
        shards=entries, samples=sum(e.samples for e in entries), classes=manifest.classes,
        options={"cleaned_with": sel.rule.label, "threshold": sel.threshold, "keep_unscored": sel.keep_unscored}))


def clean(shards_dir: str | os.PathLike, scores_dir: str | os.PathLike, out_dir: str | os.PathLike,
          rule: Rule = DEFAULT_RULE, *, keep_unscored: bool = False, progress: bool = True) -> CleanResult:
    """Write OUT/<shard>.tar with the samples the rule keeps, OUT/rejected.parquet, summary.json, manifest.json.
    Rerunning the same command resumes or does nothing; other settings into the same OUT are refused."""
    shards_dir, scores_dir, out_dir = (os.path.abspath(os.fspath(p)) for p in (shards_dir, scores_dir, out_dir))
    if os.path.realpath(out_dir) in (os.path.realpath(shards_dir), os.path.realpath(scores_dir)):
        raise ValueError(f"--out {out_dir} is the shards or scores folder; give a new folder for the cleaned shards")
    manifest = read_manifest(shards_dir)
    sel = select(scores_dir, rule, keep_unscored=keep_unscored)
    _check_coverage(manifest, sel, shards_dir, scores_dir)
    identity = _identity(sel, manifest, scores_dir)
    config = {"identity": identity, "paths": {"shards_dir": shards_dir, "scores_dir": scores_dir}}
    _claim(out_dir, identity, config["paths"])
    os.makedirs(os.path.join(out_dir, DONE_DIR), exist_ok=True)
    identity_sha = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    markers = {e.name: _marker(out_dir, e.name, identity_sha) for e in manifest.shards}
    pending = [e.name for e in manifest.shards if markers[e.name] is None]
    finals = [os.path.join(out_dir, n) for n in (REJECTED_NAME, SUMMARY_NAME, MANIFEST_NAME)]
    if pending or not all(os.path.isfile(p) for p in finals):
        if os.path.exists(finals[2]):
            os.unlink(finals[2])  # the folder is incomplete until every shard is done again
        if pending:
            _run(manifest, set(pending), markers, shards_dir, scores_dir, out_dir, sel, identity_sha, progress)
        _finish(out_dir, sel, manifest, [markers[e.name] for e in manifest.shards], config)
    by_shard = {name: Counts(**m["counts"]) for name, m in markers.items()}
    return CleanResult(out_dir=out_dir, selection=sel, counts=sum(by_shard.values(), Counts()), by_shard=by_shard,
                       written=pending, skipped=[e.name for e in manifest.shards if e.name not in set(pending)])


def _run(manifest: Manifest, pending: set[str], markers: dict[str, Any], shards_dir: str, scores_dir: str,
         out_dir: str, sel: Selection, identity_sha: str, progress: bool) -> None:
    dropped: dict[str, dict[str, tuple[float | None, str]]] = {}
    for key, shard, score, reason in zip(*(sel.dropped.column(c).to_pylist() for c in REJECTED.names)):
        dropped.setdefault(shard, {})[key] = (score, reason)
    bar = Progress(len(pending), desc="cleaning", unit="shards", stream=None if progress else io.StringIO())
    start, read = time.perf_counter(), 0
    seen: dict[str, str] = {}
    for entry in manifest.shards:
        if entry.name not in pending:  # finished earlier: only its keys matter, to spot duplicates later on
            for s in index_tar(os.path.join(shards_dir, entry.name)).samples:
                seen.setdefault(s.key, entry.name)
            continue
        for stale in glob.glob(os.path.join(glob.escape(out_dir), f".{glob.escape(entry.name)}.*.tmp")):
            os.unlink(stale)  # left by a killed run
        by = sel.by_shard.get(entry.name, Counts())
        marker = _clean_shard(entry, shards_dir, out_dir, scored=_scored_keys(scores_dir, entry.name),
                              dropped=dropped.get(entry.name, {}), keep_unscored=sel.keep_unscored, seen=seen,
                              unscored=by.unscored)
        marker["identity"] = identity_sha
        write_json_atomic(os.path.join(out_dir, DONE_DIR, _stem(entry.name) + ".json"), marker)
        markers[entry.name] = marker
        read += entry.bytes
        bar.update(1, f"{read / 1e6 / max(time.perf_counter() - start, 1e-9):.1f} MB/s")
    bar.close(f"{read / 1e6:.1f} MB read")
