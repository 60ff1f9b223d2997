"""The shards folder's contract: `manifest.json`, format `dede-shards/1`, written last by the shard stage.

Plain json and dataclasses (no torch), so the score stage, the cleaner and any dashboard read it the same way.
A folder without a valid manifest is an unfinished shard run: rerun `dede shard` to complete it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec

from dede_core.io import storage

FORMAT = "dede-shards/1"
from schemas.names import MANIFEST as MANIFEST_NAME


@dataclass(frozen=True)
class ShardEntry:
    """One tar shard of the folder."""

    name: str  # file name inside the shards folder, e.g. 000003.tar
    samples: int  # samples (one __key__ each) in the shard
    bytes: int  # file size: a rerun checks it before trusting the shard
    sha256: str  # hex digest of the whole file
    first_key: str  # __key__ of the first sample
    last_key: str  # __key__ of the last sample


@dataclass(frozen=True)
class Manifest:
    """What a shards folder holds and how it was made."""

    source: str  # the corpus it was made from: absolute local path or fsspec URL
    samples_per_shard: int  # every shard but the last holds exactly this many samples
    created: str  # UTC ISO time the manifest was written
    shards: list[ShardEntry]  # in order; sample order inside and across shards is the source's order
    samples: int  # total samples over all shards
    classes: list[str] | None = None  # label -> class name, when the source knows names
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of source entries left out
    options: dict[str, Any] = field(default_factory=dict)  # how the source was read (e.g. Parquet columns)
    # Samples still in a shard but no longer in the source: {key, shard, reason: source_removed|source_changed}.
    retired: list[dict[str, str]] = field(default_factory=list)
    source_index: dict[str, Any] | None = None  # {file, sha256, items, generation}: the per-sample fingerprints
    changes: dict[str, Any] = field(default_factory=dict)  # what the last update found: added, changed, ...
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["skipped"] = [{"key": k, "reason": r} for k, r in self.skipped]
        return out


def manifest_path(directory: str | os.PathLike) -> str:
    directory = os.fspath(directory)
    return f"{directory.rstrip('/')}/{MANIFEST_NAME}" if "://" in directory else os.path.join(directory, MANIFEST_NAME)


def _parse(data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise ValueError(f"top level is a {type(data).__name__}, expected an object")
    if data.get("format") != FORMAT:
        raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
    shards = [ShardEntry(**entry) for entry in data["shards"]]
    skipped = [(str(item["key"]), str(item["reason"])) for item in data.get("skipped", [])]
    manifest = Manifest(source=str(data["source"]), samples_per_shard=int(data["samples_per_shard"]),
                        created=str(data["created"]), shards=shards, samples=int(data["samples"]),
                        classes=data.get("classes"), skipped=skipped, options=dict(data.get("options") or {}),
                        retired=[{k: str(r[k]) for k in ("key", "shard", "reason")} for r in data.get("retired", [])],
                        source_index=data.get("source_index"), changes=dict(data.get("changes") or {}))
    counted = sum(s.samples for s in shards)
    if counted != manifest.samples:
        raise ValueError(f"samples is {manifest.samples} but the shards list {counted}")
    return manifest


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of a shards folder; ValueError when it is missing or not a valid dede-shards/1 file."""
    path = manifest_path(directory)
    fs, inner = fsspec.core.url_to_fs(path)  # a local path or a URL (s3://...)
    if not fs.isfile(inner):
        raise ValueError(f"no {MANIFEST_NAME} in {os.fspath(directory)}: not a finished shards folder; "
                         f"run `dede shard SRC --out {os.fspath(directory)}` (again) to complete it")
    try:
        with fs.open(inner, "r", encoding="utf-8") as f:
            return _parse(json.load(f))
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a valid {FORMAT} manifest ({type(exc).__name__}: {exc}); "
                         f"delete the folder and shard again") from None


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> None:
    """Write DIR/manifest.json atomically (it marks the folder complete, so it is written last)."""
    storage.write_json(manifest_path(directory), manifest.to_dict())


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'name: old -> new' for every (nested) field that differs; empty when the two settings agree."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs
