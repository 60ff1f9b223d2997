"""Data contracts of the pipeline's folders: Parquet schemas, manifest formats, SQL views.

Plain pyarrow and JSON, no torch and no prefect, so any reader (DuckDB, pandas, a dashboard) can depend on it.
"""
