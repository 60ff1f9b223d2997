"""Score stage: a shards folder -> OUT/<shard>.parquet per shard, OUT/calibration.parquet and OUT/run.json.

The shard is the unit of work: its Parquet file appears (temporary name + rename) only once every sample of it
is scored, then `_done/<shard>.json` is written last; rerunning skips shards with both. Batches still span
shards: one DataLoader runs over all pending shards and results are routed back to their shard by position.
OUT/run.json pins the detector, encoder and score settings, so one folder never mixes scores of two setups.
"""

from __future__ import annotations

import logging
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dede_core import __version__
from dede_core.io import source_index, storage
from dede_core.detector.checkpoint import Checkpoint, load_detector
from dede_core.detector.cache import load_detector_once
from dede_core.io.progress import Progress
from dede_core.detector.health import describe_health
from dede_core.detector.knn import density_score, knn_distance
from dede_core.io.loader import make_loader
from dede_core.detector.scorer import ScoreConfig, Scorer, for_checkpoint
from dede_core.stages import folder
from dede_core.io.sources import TarShardSource
from schemas.manifest import ShardEntry, differences, read_manifest
from schemas import names
from schemas.tables import (CALIBRATION, STATUS_DECODE_ERROR, STATUS_OK, STATUS_READ_ERROR, STATUS_SKIPPED,
                            scores_schema, with_metadata)

log = logging.getLogger("dede")

IGNORED_ON_RERUN = ("dede_version",)  # recorded, but a new release may finish an old run's shards


@dataclass(frozen=True)
class ScoreStageResult:
    """What one call did."""

    scored: list[str]  # shards scored and written by this call
    skipped: list[str]  # shards already complete (marker and Parquet present): not touched
    failed: dict[str, str]  # unreadable shard -> why; also OUT/_failed/<stem>.json, retried on rerun
    samples: int  # rows written by this call
    ok: int  # of which scored
    decode_errors: int
    read_errors: int
    elapsed_s: float
    images_per_s: float


def run_config(ckpt: Checkpoint, score: ScoreConfig, *, knn_k: int, with_embedding: bool, device: str,
               shards_id: str) -> dict[str, Any]:
    """Everything a score depends on; saved as OUT/run.json and in every Parquet file's metadata."""
    return {"detector_hash": ckpt.content_hash, "encoder_spec": ckpt.encoder_spec,
            "encoder_fingerprint": ckpt.encoder_fingerprint, "detector_config": ckpt.config.to_dict(),
            "score": score.to_dict(), "knn_k": knn_k, "with_embedding": with_embedding,
            "detector_health": ckpt.meta.get("health"),
            # bf16 autocast on CUDA gives other (close) numbers than the CPU: one folder holds one kind.
            "device_type": torch.device(device).type, "shards": shards_id, "dede_version": __version__}


def _claim_run(out_dir: str, config: dict[str, Any], markers: folder.Markers, entries: list[ShardEntry]) -> None:
    """OUT/run.json: the setup every score of the folder is made with. A rerun may only add shards (a corpus
    grown by `dede shard`, every finished shard unchanged in the manifest); other settings are refused."""
    strip = lambda d: {k: v for k, v in d.items() if k not in IGNORED_ON_RERUN}  # noqa: E731

    def check(old: dict[str, Any]) -> bool:
        diffs = differences(strip(old), strip(config))
        by_name = {e.name: e.sha256 for e in entries}
        grown = all(by_name.get(m.get("shard")) == m.get("sha256") for m in markers.all_done())
        if diffs and all(d.startswith("shards:") for d in diffs) and grown:
            return True
        folder.refuse(out_dir, "scores", diffs, "scores of two setups never mix: ")
        return False

    folder.claim(out_dir, names.SCORE_RUN, config, check=check)


def _select(entries: list[ShardEntry], wanted: list[str] | None) -> list[ShardEntry]:
    if wanted is None:
        return list(entries)
    by_name = {e.name: e for e in entries} | {os.path.splitext(e.name)[0]: e for e in entries}
    unknown = [w for w in wanted if os.path.basename(w) not in by_name]
    if unknown:
        raise ValueError(f"shards {unknown[:5]} are not in the manifest (it lists {entries[0].name} .. "
                         f"{entries[-1].name})" if entries else f"shards {unknown[:5]}: the manifest lists none")
    picked = {by_name[os.path.basename(w)].name for w in wanted}
    return [e for e in entries if e.name in picked]


class _ShardRows:
    """One pending shard: its reader and its result columns, filled by position as batches come back."""

    def __init__(self, entry: ShardEntry, source: TarShardSource, refs: dict[str, str]) -> None:
        self.entry, self.source, self.keys = entry, source, source.keys()
        self.sources = [_reference(source.meta(i), refs.get(key)) for i, key in enumerate(self.keys)]
        self.stem = os.path.splitext(entry.name)[0]
        # Members the reader could not make a sample of come last, as read_error rows: nothing disappears.
        n = len(self.keys) + len(source.skipped)
        self.rows: list[dict[str, Any] | None] = [None] * n
        for j, (key, reason) in enumerate(source.skipped):
            self.rows[len(self.keys) + j] = {"key": key, "label": None, "width": None, "height": None,
                                             "status": STATUS_READ_ERROR, "error": reason}
        self.missing = len(self.keys)
        self.started: float | None = None


def _reference(meta: dict[str, Any], indexed: str | None) -> str | None:
    """A sample's source reference: its .json's `source` (written by `dede shard`), else the shards folder's
    source index, else the image folder path an older .json holds."""
    found = meta.get("source") or indexed or meta.get("path")
    return found if isinstance(found, str) else None


def source_refs(shards_dir: str) -> dict[str, str]:
    """key -> source reference from the shards folder's source index ({} when it has none)."""
    index = source_index.read(shards_dir, read_manifest(shards_dir).source_index) or {}
    return {key: entry.item for key, entry in index.items() if entry.item is not None}


def _open_part(shards_dir: str, entry: ShardEntry, scratch: str | None, refs: dict[str, str]) -> _ShardRows:
    """Index one shard; ValueError/OSError when it is missing, cut short or not a tar (the shard fails).
    A shard at a URL is downloaded into `scratch` first: the reader needs random access."""
    path = storage.join(shards_dir, entry.name)
    size = storage.getsize(path)
    if size != entry.bytes:
        raise ValueError(f"{path} is {size} bytes but the manifest says {entry.bytes}: it changed or was cut "
                         f"short since sharding; reshard or restore it")
    return _ShardRows(entry, TarShardSource([storage.local_copy(path, scratch or "")]), refs)


def _write_parquet(table: pa.Table, path: str) -> None:
    with storage.AtomicFile(path) as f:
        pq.write_table(table, f)


class _Run:
    """One call's fixed context: where to write, the scorer, the bank, the schema with its metadata."""

    def __init__(self, out_dir: str, scorer: Scorer, ckpt: Checkpoint, config: dict[str, Any],
                 markers: folder.Markers) -> None:
        self.out_dir, self.scorer, self.ckpt, self.config, self.markers = out_dir, scorer, ckpt, config, markers
        self.knn_k, self.with_embedding = config["knn_k"], config["with_embedding"]
        self.bank = None if ckpt.knn_bank is None else ckpt.knn_bank.to(scorer.device, torch.float32)
        config_json = json.dumps(config, sort_keys=True)
        self.schema = with_metadata(scores_schema(self.with_embedding), "scores", config_json)
        self.calibration_schema = with_metadata(CALIBRATION, "calibration", config_json)
        self.constant = {"draws": config["score"]["draws"], "detector_hash": ckpt.content_hash,
                         "encoder_id": f"{ckpt.encoder_spec}#{ckpt.encoder_fingerprint[:16]}"}
        self.calibration_embeddings = ckpt.calibration_embeddings
        if ckpt.calibration_images is not None and self.calibration_embeddings is None:
            # a checkpoint without stored embeddings: its held-out images are embedded here
            self.calibration_embeddings = scorer.embed(ckpt.calibration_images)
        # The held-out images' k-distances: the reference of the two-sided density score.
        self.reference_knn = None
        if self.calibration_embeddings is not None and len(self.calibration_embeddings):
            self.reference_knn = knn_distance(self.calibration_embeddings, self.bank, self.knn_k,
                                              chunk=scorer.config.chunk)

    def score(self, images: torch.Tensor, keys: list[str], *, victim: torch.Tensor | None = None,
              embedding: torch.Tensor | None = None) -> dict[str, list]:
        """-> {score, recon_error, knn_score, density_score, embedding}, one list entry per key."""
        out = self.scorer.score(images, keys, victim=victim, embedding=embedding)
        knn = knn_distance(out.embedding, self.bank, self.knn_k, chunk=self.scorer.config.chunk)
        none = [None] * len(keys)
        density = none if knn is None or self.reference_knn is None else density_score(knn, self.reference_knn)
        return {"score": out.score.tolist(), "recon_error": out.error.tolist(),
                "knn_score": none if knn is None else knn.tolist(),
                "density_score": density if isinstance(density, list) else density.tolist(),
                "embedding": list(out.embedding.numpy())}

    def write_shard(self, part: _ShardRows) -> Counter:
        """OUT/<stem>.parquet (temp + rename), then the _done marker last; returns the status counts."""
        columns = {name: [row.get(name) for row in part.rows] for name in self.schema.names
                   if name not in self.constant}
        columns |= {"shard": [part.entry.name] * len(part.rows), "position": list(range(len(part.rows)))}
        columns |= {name: [value] * len(part.rows) for name, value in self.constant.items()}
        _write_parquet(pa.Table.from_pydict(columns, schema=self.schema),
                       storage.join(self.out_dir, f"{part.stem}.parquet"))
        counts = Counter(columns["status"])
        elapsed = 0.0 if part.started is None else time.perf_counter() - part.started
        self.markers.mark_done(part.entry.name, {"shard": part.entry.name, "rows": len(part.rows), "counts": counts,
                                                 "elapsed_s": round(elapsed, 3), "sha256": part.entry.sha256,
                                                 "detector_hash": self.ckpt.content_hash})
        return counts

    def write_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """OUT/skipped.parquet: a row (status skipped, shard "", error = why) per source entry that `dede shard`
        left out, so one query over the scores view accounts for every input; rewritten when the list changes."""
        path = storage.join(self.out_dir, names.SKIPPED)
        if storage.isfile(path):
            with storage.open_read(path) as f:
                had = pq.read_table(f, columns=["key", "error"]).to_pylist()
            if [(r["key"], r["error"]) for r in had] == list(skipped):
                return
        elif not skipped:
            return
        n = len(skipped)
        columns = {name: [None] * n for name in self.schema.names}
        columns |= {"key": [k for k, _ in skipped], "error": [r for _, r in skipped], "shard": [""] * n,
                    "position": list(range(n)), "status": [STATUS_SKIPPED] * n}
        columns |= {name: [value] * n for name, value in self.constant.items()}
        _write_parquet(pa.Table.from_pydict(columns, schema=self.schema), path)

    def write_calibration(self, batch_size: int) -> None:
        """OUT/calibration.parquet: the checkpoint's held-out images, scored exactly like the corpus."""
        keys, images, embeddings = self.ckpt.calibration_keys, self.ckpt.calibration_images, self.calibration_embeddings
        columns: dict[str, list] = {name: [] for name in self.calibration_schema.names}
        for start in range(0, len(keys) if images is not None else 0, batch_size):
            stop = start + batch_size
            scored = self.score(images[start:stop], keys[start:stop], embedding=embeddings[start:stop])
            for name in columns:  # knn and density are None when the detector carries no k-NN bank
                columns[name] += keys[start:stop] if name == "key" else scored[name]
        table = pa.Table.from_pydict(columns, schema=self.calibration_schema)
        _write_parquet(table, storage.join(self.out_dir, names.CALIBRATION))


def _route(batch: dict[str, Any], parts: list[_ShardRows], run: _Run) -> list[_ShardRows]:
    """Score a batch, put each row into its shard; returns the shards this batch completed."""
    ok = [i for i, status in enumerate(batch["status"]) if status == STATUS_OK]
    image, victim = batch["views"]
    results = run.score(image[ok], [batch["key"][i] for i in ok], victim=victim[ok]) if ok else {}
    scored = {i: {name: values[j] for name, values in results.items()} for j, i in enumerate(ok)}
    completed = []
    now = time.perf_counter()
    for i, (p, position) in enumerate(zip(batch["part"], batch["position"])):
        part = parts[p]
        part.started = part.started or now
        row = {name: batch[name][i] for name in ("label", "width", "height", "status", "error")}
        row["key"] = part.keys[position]  # known from the shard's index even when the sample cannot be read
        row["source"] = part.sources[position]
        if i in scored:
            row |= scored[i]
        part.rows[position] = row
        part.missing -= 1
        if part.missing == 0:
            completed.append(part)
    return completed


def _check_args(knn_k: int, batch_size: int, workers: int, device: str, ckpt: Checkpoint) -> None:
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be cpu, cuda or cuda:N (resolve 'auto' first), got {device!r}") from None
    for name, value, low in (("knn_k", knn_k, 1), ("batch_size", batch_size, 1), ("workers", workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    bank = 0 if ckpt.knn_bank is None else ckpt.knn_bank.shape[0]
    if 0 < bank < knn_k:
        raise ValueError(f"knn_k={knn_k} but the detector's k-NN bank holds {bank} embeddings; pass knn_k <= {bank}")


def _is_done(out_dir: str, markers: folder.Markers, entry: ShardEntry) -> bool:
    return (markers.done(entry.name) is not None
            and storage.isfile(storage.join(out_dir, f"{folder.stem(entry.name)}.parquet")))


def _open_parts(shards_dir: str, markers: folder.Markers, todo: list[ShardEntry],
                scratch: str | None = None) -> tuple[list[_ShardRows], dict[str, str]]:
    """Index the pending shards; a broken one is recorded in _failed/ and left out, the others go on."""
    parts, failed = [], {}
    refs = source_refs(shards_dir) if todo else {}
    for entry in todo:
        try:
            parts.append(_open_part(shards_dir, entry, scratch, refs))
        except (OSError, ValueError) as exc:
            failed[entry.name] = f"{type(exc).__name__}: {exc}"
            log.warning(f"shard {entry.name} cannot be read and is not scored: {failed[entry.name]}")
            markers.mark_failed(entry.name, failed[entry.name])
    return parts, failed



def score_shards(shards_dir: str, *, detector: str, out_dir: str, score: ScoreConfig = ScoreConfig(),
                 knn_k: int = 10, with_embedding: bool = False, batch_size: int = 256, workers: int = 2,
                 device: str = "cpu", shards: list[str] | None = None, progress: bool = True, encoder: str | None = None,
                 reuse_detector: bool = False) -> ScoreStageResult:
    """Score every sample of a shards folder (or the named `shards` of it) into OUT/<shard>.parquet.

    Rerunning skips finished shards, retries failed ones, and refuses if the detector or settings changed.
    `shards=[]` scores no shard but writes OUT/run.json and OUT/calibration.parquet (a flow's first task).
    `encoder`: the victim's spec, when the detector's own must not be trusted to run code (checkpoint.load_detector).
    `reuse_detector`: keep the loaded detector for the next call in this process (a worker's later tasks).
    SHARDS and OUT may be fsspec URLs (dede_core.io.storage): shards are then downloaded one call at a time.
    """
    started = time.perf_counter()
    shards_dir, out_dir = os.fspath(shards_dir), os.fspath(out_dir)
    manifest = read_manifest(shards_dir)
    entries = _select(manifest.shards, shards)
    load = load_detector_once if reuse_detector else load_detector
    model, encoder, ckpt = load(detector, encoder_spec=encoder)
    _check_args(knn_k, batch_size, workers, device, ckpt)
    score = for_checkpoint(score, ckpt)
    scorer = Scorer(detector=model, encoder=encoder, config=score, device=device, references=ckpt.knn_bank)
    listing = json.dumps([[e.name, e.sha256] for e in manifest.shards]).encode()
    shards_id = f"{len(manifest.shards)} shards, sha256 {hashlib.sha256(listing).hexdigest()[:16]}"
    config = run_config(ckpt, score, knn_k=knn_k, with_embedding=with_embedding, device=device, shards_id=shards_id)
    markers = folder.Markers(out_dir)
    _claim_run(out_dir, config, markers, manifest.shards)
    if not shards:  # a whole-folder call, or a flow's first task: once per run, not once per shard group
        log.info(describe_health(ckpt.meta.get("health")))
    run = _Run(out_dir, scorer, ckpt, config, markers)
    if not storage.isfile(storage.join(out_dir, names.CALIBRATION)):
        run.write_calibration(batch_size)
    if not shards:  # a whole-folder call (or a flow's first task): never two tasks at once
        markers.sweep()
        run.write_skipped(list(manifest.skipped))
    skipped = [e.name for e in entries if _is_done(out_dir, markers, e)]
    scratch = storage.scratch(shards_dir)  # downloaded shards, when SHARDS is a URL
    try:
        parts, failed = _open_parts(shards_dir, markers, [e for e in entries if e.name not in skipped],
                                    scratch.name if scratch else None)
        counts = _score_parts(parts, run, batch_size=batch_size, workers=workers, progress=progress)
    finally:
        if scratch:
            scratch.cleanup()
    elapsed = time.perf_counter() - started
    rows = sum(counts.values())
    result = ScoreStageResult(scored=[p.entry.name for p in parts], skipped=skipped, failed=failed, samples=rows,
                              ok=counts[STATUS_OK], decode_errors=counts[STATUS_DECODE_ERROR],
                              read_errors=counts[STATUS_READ_ERROR], elapsed_s=elapsed,
                              images_per_s=rows / elapsed if elapsed > 0 else 0.0)
    log.info(f"scored {rows} samples in {len(parts)} shards ({result.images_per_s:.1f} img/s); {len(skipped)} "
        f"already done; {len(failed)} unreadable{' (see _failed/)' if failed else ''} -> {out_dir}")
    return result


def _score_parts(parts: list[_ShardRows], run: _Run, *, batch_size: int, workers: int,
                 progress: bool) -> Counter:
    """Decode in workers, score batch by batch, write each shard as soon as its last sample is back."""
    counts: Counter = Counter()
    for part in [p for p in parts if p.missing == 0]:  # nothing readable inside: only read_error rows
        counts += run.write_shard(part)
    loader = make_loader([p.source for p in parts], views=(run.ckpt.config.view, run.scorer.encoder.view),
                         batch_size=batch_size, workers=workers, pin_memory=run.scorer.device.type == "cuda")
    total = len(loader.dataset)
    bar = Progress(total, desc="scoring", quiet=not (progress and total))
    done = len(parts) - sum(1 for p in parts if p.missing)
    if total:
        for batch in loader:
            for part in _route(batch, parts, run):
                counts += run.write_shard(part)
                part.rows = []  # free the finished shard's results
                done += 1
            bar.update(len(batch["key"]), f"shards {done}/{len(parts)}")
    bar.close(f"shards {done}/{len(parts)}")
    return counts
