"""The pipeline stages, each reading only the previous stage's folder: shard, score, select, clean, report,
and the run record."""
