"""Every file and folder name the pipeline writes, in one place: the stages, the flows and any reader agree.

RUN (dede sanitize)          shards/ detector/ scores/ clean/ report.html report_images/ sanitize.json
shards/ (dede shard)         NNNNNN.tar, NNNNNN.spans.json, source-NNNNNN.parquet, manifest.json (written last:
                             the folder is done)
detector/ (dede train)       detector.pt (every epoch), aux_cache.pt
scores/ (dede score)         run.json (claims the folder), NNNNNN.parquet, embeddings/NNNNNN.parquet,
                             calibration.parquet, skipped.parquet,
                             _done/NNNNNN.json (written last per shard), _failed/NNNNNN.json
embeddings/ (in scores/)     NNNNNN.parquet: each sample's victim embedding (float16) and 16x16 thumbnail
neighbours/ (dede neighbours) neighbours_config.json (claims the folder), index.faiss, index.json, thumbs.npy,
                             _parts/NNNNNN.parquet + _done/NNNNNN.json (per shard), NNNNNN.parquet, summary.json
clean/ (dede clean)          clean_config.json (claims the folder), NNNNNN.tar, _done/NNNNNN.rejected.parquet,
                             _done/NNNNNN.json (written last per shard), manifest.json, rejected.parquet,
                             summary.json
review/ (dede review)        decisions.parquet
"""

# Stage folders inside a sanitize RUN folder.
SHARDS_DIR, DETECTOR_DIR, SCORES_DIR, CLEAN_DIR = "shards", "detector", "scores", "clean"
NEIGHBOURS_DIR = "neighbours"
REPORT = "report.html"
IMAGES_SUFFIX = "_images"  # beside an HTML page (report.html, dede sql --html): <stem>_images/, its full-size images
RUN_RECORD = "sanitize.json"  # config, versions, detector hash, counts and timings of one sanitize run

# Shards folder (and the cleaned one, which is a shards folder too).
MANIFEST = "manifest.json"
SPANS_SUFFIX = ".spans.json"  # NNNNNN.spans.json beside NNNNNN.tar: its samples' byte spans (optional)

# Detector folder.
CHECKPOINT = "detector.pt"
AUX_CACHE = "aux_cache.pt"

# Markers, in the scores and clean folders: one file per finished (or failed) shard.
DONE_DIR, FAILED_DIR = "_done", "_failed"

# Scores folder.
SCORE_RUN = "run.json"  # the detector and settings every score of the folder was made with
CALIBRATION = "calibration.parquet"  # the detector's held-out images, scored like the corpus
SKIPPED = "skipped.parquet"  # the shards manifest's skipped entries as rows, so the scores account for all
EMBEDDINGS_DIR = "embeddings"  # SCORES/embeddings/NNNNNN.parquet: embedding + thumbnail per sample

# Neighbours folder (a corpus-level stage: its index and per-sample neighbourhood statistics).
NEIGHBOURS_CONFIG = "neighbours_config.json"  # the scores identity and settings every file of the folder is made with
INDEX = "index.faiss"  # the FAISS index over every embedding of the corpus (rebuilt when the corpus grows)
INDEX_INFO = "index.json"  # what the index holds: the corpus id, kind, N, dims, nlist/nprobe, timings
THUMBS = "thumbs.npy"  # uint8 (rows, 256): every sample's thumbnail in corpus row order, memory-mapped by jobs
PARTS_DIR = "_parts"  # _parts/NNNNNN.parquet: a shard's raw neighbour lists, before the corpus statistics

# Clean folder.
CLEAN_CONFIG = "clean_config.json"  # the selection every cleaned shard of the folder was made with
REJECTED = "rejected.parquet"
SUMMARY = "summary.json"
VERDICT = "verdict.parquet"  # an fdr rule's p-values of every scored sample (dede_core.signals.verdict)

# Review folder (dede review): the only place the review app writes.
REVIEW_DIR = "review"
DECISIONS = "decisions.parquet"  # the reviewer's keep/drop decisions (schemas/tables.py DECISIONS)
