"""Flow: pack a corpus into WebDataset shards plus a manifest (one task: dede_core.stages.shard.update_shards)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from dede_core.stages.shard import update_shards
from flows import retry_transient


@dataclass(frozen=True)
class ShardSettings:
    """How a corpus is sharded (dede_core.stages.shard.update_shards' options)."""

    samples_per_shard: int = 10_000
    image_column: str | None = None  # Parquet: column of image bytes (default: detected)
    key_column: str | None = None  # Parquet: column of sample keys (default: row numbers)
    label_column: str | None = None  # Parquet: column of labels (default: 'label' if any)
    follow_external_links: bool = False  # read symlinks that leave SRC (for corpora you trust)


# Retried only for transient errors: a Parquet source may be a remote fsspec URL.
@task(name="write-shards", cache_policy=NONE, retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def shard_task(src: str, out: str, settings: ShardSettings) -> dict:
    update = update_shards(src, out, **dataclasses.asdict(settings))
    manifest = update.manifest
    get_run_logger().info(f"{manifest.samples} samples in {len(manifest.shards)} shards -> {out}; this run: "
                          f"{update.changes.text()}")
    return {"out": out, "samples": manifest.samples, "shards": [e.name for e in manifest.shards],
            "not_sharded": len(manifest.skipped), "changes": update.changes.summary()}


@flow(name="dede-shard")
def shard_flow(src: str, out: str, settings: ShardSettings = ShardSettings()) -> dict:
    """Write SRC (image folder, WebDataset shards or a Parquet file of image bytes) as OUT/NNNNNN.tar +
    OUT/manifest.json; a rerun brings OUT up to date with SRC (dede_core.stages.shard.update_shards). Returns
    {out, samples, shards, not_sharded, changes}."""
    return shard_task(src, out, settings)
