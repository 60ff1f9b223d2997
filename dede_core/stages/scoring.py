"""A scores folder's identity and writer, shared by the score stage's plan and its jobs (dede_core.stages.score).

OUT/run.json pins everything a score depends on (run_config); `open_writer` loads the detector once per process,
checks the settings and claims OUT, and the ScoreWriter it returns scores batches and writes a shard's Parquet
file (marker last), OUT/calibration.parquet and OUT/skipped.parquet.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dede_core import __version__
from dede_core.detector.cache import load_detector_once
from dede_core.detector.checkpoint import Checkpoint
from dede_core.detector.knn import density_score, knn_distance
from dede_core.detector.scorer import ScoreConfig, Scorer, for_checkpoint
from dede_core.io import storage
from dede_core.stages import folder
from dede_core.stages.embeddings import thumbnails, write_embeddings
from schemas import names
from schemas.manifest import Manifest, ShardEntry, differences
from schemas.tables import CALIBRATION, STATUS_SKIPPED, scores_schema, with_metadata

if TYPE_CHECKING:
    from dede_core.stages.score import ScoreRun
    from dede_core.stages.score_batches import ShardRows


IGNORED_ON_RERUN = ("dede_version",)  # recorded, but a new release may finish an old run's shards


def run_config(ckpt: Checkpoint, score: ScoreConfig, *, knn_k: int, with_embedding: bool, device: str,
               shards_id: str) -> dict[str, Any]:
    """Everything a score depends on; saved as OUT/run.json and in every Parquet file's metadata."""
    return {"detector_hash": ckpt.content_hash, "encoder_spec": ckpt.encoder_spec,
            "encoder_fingerprint": ckpt.encoder_fingerprint, "detector_config": ckpt.config.to_dict(),
            "score": score.to_dict(), "knn_k": knn_k, "with_embedding": with_embedding,
            "detector_health": ckpt.meta.get("health"),
            # bf16 autocast on CUDA gives other (close) numbers than the CPU: one folder holds one kind.
            "device_type": torch.device(device).type, "shards": shards_id, "dede_version": __version__}


def claim_run(out_dir: str, config: dict[str, Any], markers: folder.Markers, entries: list[ShardEntry]) -> None:
    """OUT/run.json: the setup every score of the folder is made with. A rerun may only add shards (a corpus
    grown by `dede shard`, every finished shard unchanged in the manifest); other settings are refused."""
    strip = lambda d: {k: v for k, v in d.items() if k not in IGNORED_ON_RERUN}  # noqa: E731

    def check(old: dict[str, Any]) -> bool:
        diffs = differences(strip(old), strip(config))
        by_name = {e.name: e for e in entries}
        grown = all(m.get("shard") in by_name and by_name[m["shard"]].digest == m.get(by_name[m["shard"]].hash)
                    for m in markers.all_done())
        if diffs and all(d.startswith("shards:") for d in diffs) and grown:
            return True
        folder.refuse(out_dir, "scores", diffs, "scores of two setups never mix: ")
        return False

    folder.claim(out_dir, names.SCORE_RUN, config, check=check)


def check_args(knn_k: int, batch_size: int, workers: int | None, device: str, ckpt: Checkpoint) -> None:
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be cpu, cuda or cuda:N (resolve 'auto' first), got {device!r}") from None
    checked = (("knn_k", knn_k, 1), ("batch_size", batch_size, 1)) + ((("workers", workers, 0),) if workers is not None
                                                                    else ())
    for name, value, low in checked:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    bank = 0 if ckpt.knn_bank is None else ckpt.knn_bank.shape[0]
    if 0 < bank < knn_k:
        raise ValueError(f"knn_k={knn_k} but the detector's k-NN bank holds {bank} embeddings; pass knn_k <= {bank}")


def open_writer(run: ScoreRun, manifest: Manifest) -> ScoreWriter:
    """Load the detector (once per process), check the settings, claim OUT: the context plan and jobs share."""
    s = run.settings
    model, encoder, ckpt = load_detector_once(run.detector, encoder_spec=s.encoder)
    check_args(s.knn_k, s.batch_size, s.workers, s.device, ckpt)
    score = for_checkpoint(s.score, ckpt)
    scorer = Scorer(detector=model, encoder=encoder, config=score, device=s.device, references=ckpt.knn_bank)
    listing = json.dumps([[e.name, e.digest] for e in manifest.shards]).encode()
    shards_id = f"{len(manifest.shards)} shards, sha256 {hashlib.sha256(listing).hexdigest()[:16]}"
    config = run_config(ckpt, score, knn_k=s.knn_k, with_embedding=s.with_embedding, device=s.device,
                        shards_id=shards_id)
    markers = folder.Markers(run.out)
    claim_run(run.out, config, markers, manifest.shards)
    return ScoreWriter(run.out, scorer, ckpt, config, markers)


class ScoreWriter:
    """One job's fixed context: where to write, the scorer, the bank, the schema with its metadata."""

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
        """-> {score, recon_error, knn_score, density_score, embedding, thumb}, one list entry per key."""
        out = self.scorer.score(images, keys, victim=victim, embedding=embedding)
        knn = knn_distance(out.embedding, self.bank, self.knn_k, chunk=self.scorer.config.chunk)
        none = [None] * len(keys)
        density = none if knn is None or self.reference_knn is None else density_score(knn, self.reference_knn)
        return {"score": out.score.tolist(), "recon_error": out.error.tolist(),
                "knn_score": none if knn is None else knn.tolist(),
                "density_score": density if isinstance(density, list) else density.tolist(),
                "embedding": list(out.embedding.numpy()), "thumb": list(thumbnails(images))}

    def write_shard(self, part: ShardRows) -> Counter:
        """OUT/embeddings/<stem>.parquet, OUT/<stem>.parquet (temp + rename), then the _done marker last; returns
        the status counts."""
        write_embeddings(self.out_dir, part.stem, [row["key"] for row in part.rows],
                         [row.get("embedding") for row in part.rows], [row.get("thumb") for row in part.rows],
                         self.scorer.encoder.dim)
        columns = {name: [row.get(name) for row in part.rows] for name in self.schema.names
                   if name not in self.constant}
        columns |= {"shard": [part.entry.name] * len(part.rows), "position": list(range(len(part.rows)))}
        columns |= {name: [value] * len(part.rows) for name, value in self.constant.items()}
        storage.write_parquet(storage.join(self.out_dir, f"{part.stem}.parquet"),
                              pa.Table.from_pydict(columns, schema=self.schema))
        counts = Counter(columns["status"])
        elapsed = 0.0 if part.started is None else time.perf_counter() - part.started
        self.markers.mark_done(part.entry.name, {"shard": part.entry.name, "rows": len(part.rows), "counts": counts,
                                                 "elapsed_s": round(elapsed, 3), part.entry.hash: part.entry.digest,
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
        storage.write_parquet(path, pa.Table.from_pydict(columns, schema=self.schema))

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
        storage.write_parquet(storage.join(self.out_dir, names.CALIBRATION), table)


