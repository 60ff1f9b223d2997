"""Parquet schemas, defined once. Each table's metadata carries `dede.schema` and the run's config as JSON."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"

# Sample statuses in the scores table.
STATUS_OK = "ok"  # decoded and scored
STATUS_DECODE_ERROR = "decode_error"  # bytes present, not a usable image (error says why)
STATUS_READ_ERROR = "read_error"  # the sample could not be read from its shard
STATUS_SKIPPED = "skipped"  # a source entry `dede shard` left out (SCORES/skipped.parquet; shard is "")

# Where a sample came from, relative to the corpus (the shards manifest's `source`): "cat/001.png",
# "train-00000.parquet#row=12" or "src.tar#cat_001.png"; null when unknown (files written before the column).
SOURCE_FIELD = pa.field("source", pa.string())

SCORES = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # the WebDataset __key__, stable from ingest to clean
    pa.field("shard", pa.string(), nullable=False),  # shard file name, e.g. 000003.tar
    pa.field("position", pa.int32(), nullable=False),  # index of the sample inside its shard
    SOURCE_FIELD,
    pa.field("label", pa.int32()),  # class index from .cls, when present
    pa.field("width", pa.int32()),  # original image width, when decodable
    pa.field("height", pa.int32()),  # original image height, when decodable
    pa.field("status", pa.string(), nullable=False),  # ok | decode_error | read_error | skipped
    pa.field("error", pa.string()),  # the reason when status is not ok
    pa.field("score", pa.float64()),  # recon_error / 10th percentile of reference errors (null if not ok)
    pa.field("recon_error", pa.float64()),  # DeDe's error: mean over draws of the summed squared error
    pa.field("draws", pa.int16(), nullable=False),  # mask draws behind the score
    pa.field("knn_score", pa.float64()),  # distance to the k-th nearest calibration embedding (null if not ok)
    # |log knn_score - median| / MAD of the held-out images' log knn_score: an abnormally tight or loose neighbourhood
    pa.field("density_score", pa.float64()),
    pa.field("detector_hash", pa.string(), nullable=False),  # content hash of the detector checkpoint
    pa.field("encoder_id", pa.string(), nullable=False),  # encoder spec # first 16 hex of its weight fingerprint
])

EMBEDDING_FIELD = pa.field("embedding", pa.list_(pa.float32()))  # optional column: the victim's raw embedding

CALIBRATION = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # held-out auxiliary sample (never trained on)
    pa.field("score", pa.float64(), nullable=False),
    pa.field("recon_error", pa.float64()),
    pa.field("knn_score", pa.float64()),  # null when the detector carries no k-NN bank
    pa.field("density_score", pa.float64()),
])

REJECTED = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    SOURCE_FIELD,  # as in the scores table; null for tar members that are no sample
    pa.field("score", pa.float64()),
    pa.field("reason", pa.string(), nullable=False),  # e.g. "score > 812.4 (fpr 0.05)", "decode_error: ..."
])


THUMB_SIDE = 16  # embeddings files carry a THUMB_SIDE x THUMB_SIDE grayscale thumbnail per sample

# SCORES/embeddings/<stem>.parquet, written by the score stage, one row per sample in shard position order.
# `embedding` is fixed_size_list<halffloat>[D] with the victim's D: write with embeddings_schema(D); this
# constant shows the columns with D left open (a variable list).
EMBEDDINGS = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # the WebDataset __key__
    pa.field("position", pa.int32(), nullable=False),  # index of the sample inside its shard
    pa.field("embedding", pa.list_(pa.float16())),  # the victim's raw embedding; null when not scored
    # 16x16 grayscale thumbnail, row-major; null when not scored
    pa.field("thumb", pa.list_(pa.uint8(), THUMB_SIDE * THUMB_SIDE)),
])


def embeddings_schema(dim: int) -> pa.Schema:
    """EMBEDDINGS with the embedding column fixed to `dim` values."""
    return EMBEDDINGS.set(2, pa.field("embedding", pa.list_(pa.float16(), dim)))


# NEIGHBOURS/_parts/<stem>.parquet: one shard's raw neighbour lists (k_max nearest other samples), internal to the
# neighbours stage; the lists are null for samples without an embedding.
def neighbour_parts_schema(k: int) -> pa.Schema:
    return pa.schema([
        pa.field("row", pa.int64(), nullable=False),  # the sample's row id: its place in the corpus (shards in order)
        pa.field("ids", pa.list_(pa.int64(), k)),  # row ids of its k nearest other samples, nearest first
        pa.field("dist", pa.list_(pa.float32(), k)),  # their cosine distances (1 - cos)
        pa.field("dup", pa.list_(pa.bool_(), k)),  # whether each is a near-duplicate (thumbnail correlation)
        pa.field("pix", pa.list_(pa.float32(), k)),  # root-mean-square grey difference of the two thumbnails
    ])


# NEIGHBOURS/<stem>.parquet: the corpus-level neighbourhood of every sample of one shard, in shard order.
# Distances are cosine distances 1 - cos between victim embeddings; null for a sample without an embedding.
# One kdist_<k> column per k of the settings (NeighboursSettings.ks); NEIGHBOURS is the default ks' schema.
def neighbours_schema(ks: tuple[int, ...] = (3, 5, 10, 20)) -> pa.Schema:
    return pa.schema([
        pa.field("key", pa.string(), nullable=False),  # the WebDataset __key__
        pa.field("shard", pa.string(), nullable=False),  # shard file name, e.g. 000003.tar
        pa.field("position", pa.int32(), nullable=False),  # index of the sample inside its shard
        pa.field("row", pa.int64(), nullable=False),  # its row id in the corpus (shards in order), as group_id uses
        # kdist_<k>: distance to the k-th nearest other sample
        *[pa.field(f"kdist_{k}", pa.float64()) for k in ks],
        pa.field("lid", pa.float64()),  # local intrinsic dimension, Levina-Bickel MLE over the k_max distances
        pa.field("slof", pa.float64()),  # simplified LOF: kdist_10 / mean kdist_10 of its 10 neighbours
        pa.field("dao", pa.float64()),  # dimensionality-aware outlier score: mean (kdist_10/kdist_10(o))^lid(o)
        pa.field("kdist_distinct", pa.float64()),  # distance to the 5th nearest neighbour that is no near-duplicate
        pa.field("dup_count", pa.int32()),  # near-duplicates among its k_max neighbours
        # mean thumbnail difference to its 5 nearest neighbours / kdist_5: tight in the embedding, unlike in pixels
        pa.field("collapse", pa.float64()),
        pa.field("group_id", pa.int64()),  # lowest row id of its tight group (edges closer than tau); alone: its row
        pa.field("group_size", pa.int32()),  # samples in that group; 1 for one with no abnormally close neighbour
    ])


NEIGHBOURS = neighbours_schema()


# A reviewer's decisions about a run (`dede review`, RUN/review/decisions.parquet), applied by `dede clean --decisions`
# on top of the rule: one row per key, the latest decision wins.
DECISION_KEEP, DECISION_DROP = "keep", "drop"
DECISIONS = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # the sample's key, as in the scores table
    pa.field("decision", pa.string(), nullable=False),  # keep (stays in the cleaned corpus) | drop (leaves it)
    pa.field("note", pa.string()),  # the reviewer's free text; a drop's reason is "reviewer: <note>"
    pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("group", pa.string()),  # the group the decision was made for, null for a single sample
])


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A table of an older file as `schema`: columns it lacks (e.g. `source`) become nulls, then cast."""
    for i, field in enumerate(schema):
        if field.name not in table.column_names:
            table = table.add_column(i, field.name, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def scores_schema(with_embedding: bool) -> pa.Schema:
    return SCORES.append(EMBEDDING_FIELD) if with_embedding else SCORES


def with_metadata(schema: pa.Schema, kind: str, config_json: str) -> pa.Schema:
    """Attach the table kind, the schema version and the run config (JSON) to a schema."""
    return schema.with_metadata({"dede.table": kind, "dede.schema": SCHEMA_VERSION, "dede.config": config_json})
