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
from schemas.names import MANIFEST as MANIFEST_NAME, SPANS_SUFFIX


@dataclass(frozen=True)
class ShardEntry:
    """One tar shard of the folder."""

    name: str  # file name inside the shards folder, e.g. 000003.tar
    samples: int  # samples (one __key__ each) in the shard
    bytes: int  # file size: a rerun checks it before trusting the shard
    sha256: str | None  # hex sha256 of the whole file: shards written before issue #22 (None in newer ones)
    first_key: str  # __key__ of the first sample
    last_key: str  # __key__ of the last sample
    blake3: str | None = None  # hex BLAKE3 of the whole file: shards written since issue #22

    @property
    def hash(self) -> str:
        """The algorithm of the shard's recorded digest: blake3, or sha256 in a folder written before."""
        return "blake3" if self.blake3 is not None else "sha256"

    @property
    def digest(self) -> str:
        """The shard's recorded hex digest, under `hash`."""
        return self.blake3 if self.blake3 is not None else self.sha256

    def to_dict(self) -> dict[str, Any]:
        """The entry as manifest.json holds it: the digest under its algorithm's name only."""
        out = dataclasses.asdict(self)
        out.pop("sha256" if self.blake3 is not None else "blake3")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardEntry":
        """An entry of manifest.json, written now (blake3) or before issue #22 (sha256)."""
        if (data.get("sha256") is None) == (data.get("blake3") is None):
            raise ValueError(f"shard {data.get('name')!r} records no digest, or two (blake3 and sha256)")
        return cls(**{"sha256": None, **data})


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
    # The algorithm of the shard digests its writer recorded; a folder written before issue #22 has none (sha256).
    # Each entry names its own (a folder grown since holds sha256 entries then blake3 ones).
    hash: str = "blake3"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shards"] = [e.to_dict() for e in self.shards]
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
    shards = [ShardEntry.from_dict(entry) for entry in data["shards"]]
    skipped = [(str(item["key"]), str(item["reason"])) for item in data.get("skipped", [])]
    manifest = Manifest(source=str(data["source"]), samples_per_shard=int(data["samples_per_shard"]),
                        created=str(data["created"]), shards=shards, samples=int(data["samples"]),
                        classes=data.get("classes"), skipped=skipped, options=dict(data.get("options") or {}),
                        retired=[{k: str(r[k]) for k in ("key", "shard", "reason")} for r in data.get("retired", [])],
                        source_index=data.get("source_index"), changes=dict(data.get("changes") or {}),
                        hash=str(data.get("hash", "sha256")))
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


SPANS_FORMAT = "dede-spans/1"


@dataclass(frozen=True)
class ShardSpans:
    """`<stem>.spans.json` beside a shard, format `dede-spans/1`: where each of its samples lies, so clean copies
    the runs of kept samples without parsing the tar. Optional: a shard without one (or with one that does not
    match its manifest entry) is parsed as before."""

    shard: str  # the shard's file name, e.g. 000003.tar
    bytes: int  # the shard's size and digest when the spans were recorded: must match its manifest entry
    sha256: str | None  # as the manifest entry records them: sha256 in spans written before issue #22, else None
    keys: list[str]  # sample keys in shard order
    offsets: list[int]  # len(keys) + 1: sample i is [offsets[i], offsets[i + 1]), its tar headers and padded data;
    # the last offset is where the end-of-archive blocks start
    format: str = SPANS_FORMAT
    blake3: str | None = None  # the BLAKE3 of spans written since issue #22


def spans_path(directory: str | os.PathLike, shard: str) -> str:
    """DIR/<stem>.spans.json for shard <stem>.tar."""
    name = os.path.splitext(shard)[0] + SPANS_SUFFIX
    directory = os.fspath(directory)
    return f"{directory.rstrip('/')}/{name}" if "://" in directory else os.path.join(directory, name)


def write_spans(directory: str | os.PathLike, spans: ShardSpans) -> None:
    """Write the shard's spans file atomically (before the manifest, which marks the folder complete)."""
    data = json.dumps(dataclasses.asdict(spans), separators=(",", ":")) + "\n"  # compact: two long lists
    storage.write_bytes(spans_path(directory, spans.shard), data.encode("utf-8"))


def read_spans(directory: str | os.PathLike, entry: ShardEntry) -> ShardSpans | None:
    """The spans of a manifest entry's shard; None when there is no spans file or it is not for these bytes
    (another shard's, a stale one, a damaged one), so the caller parses the tar instead."""
    fs, inner = fsspec.core.url_to_fs(spans_path(directory, entry.name))
    try:
        with fs.open(inner, "r", encoding="utf-8") as f:
            data = json.load(f)
        spans = ShardSpans(**data)
    except (OSError, ValueError, TypeError):
        return None
    offsets, n = spans.offsets, len(spans.keys)
    ok = (spans.format == SPANS_FORMAT
          and (spans.shard, spans.bytes, spans.sha256, spans.blake3) == (entry.name, entry.bytes, entry.sha256,
                                                                         entry.blake3)
          and n == entry.samples and len(offsets) == n + 1 and n > 0
          and (spans.keys[0], spans.keys[-1]) == (entry.first_key, entry.last_key)
          and all(isinstance(o, int) for o in offsets) and offsets[0] == 0 and offsets[-1] <= entry.bytes
          and all(a < b for a, b in zip(offsets, offsets[1:])))
    return spans if ok else None


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
