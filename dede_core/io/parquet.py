"""Parquet sources: one file, or a folder or glob of files (the Hugging Face `data/train-*.parquet` layout), of
encoded images, read as Samples. Local paths or fsspec URLs.

A sample's source reference (its `item` in the shards folder's source index, and the `source` column of the
scores and rejected tables) is `FILE#row=N`: FILE relative to the folder given (its base name for one file).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from typing import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dede_core.io.sources import IMAGE_EXTENSIONS, Sample, clean_key

PARQUET_EXTENSIONS = (".parquet", ".pq")
_GLOB = set("*?[")


IMAGE_COLUMNS = ("image", "bytes", "jpg", "png")  # tried in this order when image_column is not given


def _image_column(schema: pa.Schema, wanted: str | None, url: str) -> str:
    name = wanted or next((c for c in IMAGE_COLUMNS if c in schema.names), None)
    if name is None or name not in schema.names:
        raise ValueError(f"{url} has no image column {wanted or IMAGE_COLUMNS} (columns: {schema.names}); "
                         f"pass image_column")
    kind = schema.field(name).type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        kind = kind.field("bytes").type  # Hugging Face datasets store images as {bytes, path}
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise ValueError(f"column {name!r} of {url} is {schema.field(name).type}, expected encoded image bytes "
                         f"(binary, or a struct with a 'bytes' field)")
    return name


def _labels(column: pa.ChunkedArray | None, schema: pa.Schema, name: str | None
            ) -> tuple[list[int | None] | None, list[str] | None]:
    """(label per row, class names): integer labels as they are, string labels indexed by sorted name."""
    if column is None:
        return None, None
    kind = column.type
    if pa.types.is_integer(kind):
        try:  # Hugging Face ClassLabel names live in the schema metadata
            info = json.loads(schema.metadata[b"huggingface"])["info"]["features"][name]
            names = [str(n) for n in info["names"]]
        except (KeyError, TypeError, ValueError):
            names = None
        return column.to_pylist(), names
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind):
        values = column.to_pylist()
        names = sorted({str(v) for v in values if v is not None})
        index = {n: i for i, n in enumerate(names)}
        return [None if v is None else index[str(v)] for v in values], names
    raise ValueError(f"label column {name!r} is {kind}; expected integers or class-name strings")


class ParquetRows:
    """Rows of a Parquet file (local path or fsspec URL) holding encoded images, as Samples in file order.

    Keys come from key_column, else from the file name and row number (stable for the same file). Only the
    small key and label columns are read up front; image bytes stream batch by batch.
    """

    def __init__(self, url: str, *, image_column: str | None = None, key_column: str | None = None,
                 label_column: str | None = None, batch_rows: int = 256, name: str | None = None) -> None:
        self.url, self.batch_rows = url, batch_rows
        self.name = name or os.path.basename(url.rstrip("/"))  # the file in source references: NAME#row=N
        with fsspec.open(url, "rb") as f:
            pf = pq.ParquetFile(f)
            schema, rows = pf.schema_arrow, pf.metadata.num_rows
            self.image_column = _image_column(schema, image_column, url)
            label_column = label_column or ("label" if "label" in schema.names else None)
            for wanted in (key_column, label_column):
                if wanted is not None and wanted not in schema.names:
                    raise ValueError(f"{url} has no column {wanted!r} (columns: {schema.names})")
            small = pf.read(columns=[c for c in (key_column, label_column) if c])
        if key_column is not None:
            raw = small.column(key_column).to_pylist()
            if any(v is None or str(v) == "" for v in raw):
                raise ValueError(f"key column {key_column!r} of {url} has empty or null keys")
            self._keys = [clean_key(v) for v in raw]
        else:
            stem = clean_key(os.path.splitext(os.path.basename(url.rstrip("/")))[0])
            self._keys = [f"{stem}_{i:08d}" for i in range(rows)]
        column = small.column(label_column) if label_column else None
        self._labels, self.classes = _labels(column, schema, label_column)
        self.skipped: list[tuple[str, str]] = []  # rows without image bytes, filled while iterating

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def item(self, i: int) -> tuple[str, str]:
        """(NAME#row=N: the sample's source reference, the file whose size and mtime fingerprint every row)."""
        return f"{self.name}#row={i}", self.url

    def indexed(self) -> Iterator[tuple[int, Sample]]:
        """(position, sample) of every row holding image bytes, in file order (position = row)."""
        for sample in self:
            yield sample.meta["row"], sample

    def __iter__(self) -> Iterator[Sample]:
        row = 0
        with fsspec.open(self.url, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=self.batch_rows, columns=[self.image_column]):
                for value in batch.column(0).to_pylist():
                    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
                    key, label = self._keys[row], self._labels[row] if self._labels else None
                    if data:
                        meta = {"row": row, "path": path} if path else {"row": row}
                        yield Sample(key=key, data=data, label=label, meta=meta)
                    else:
                        self.skipped.append((key, f"row {row}: no image bytes"))
                    row += 1


def _union_classes(parts: list[ParquetRows]) -> tuple[list[str] | None, list[dict[int, int] | None]]:
    """One class list for several files, and per file the remap of its label indices (None: unchanged).
    String labels are indexed per file by sorted name, so files holding different names are re-indexed."""
    named = [p.classes for p in parts]
    if all(c == named[0] for c in named):
        return named[0], [None] * len(parts)
    if any(c is None for c in named):
        raise ValueError("some Parquet files name their classes and others do not; give --label-column with the "
                         "same kind of labels in every file")
    union = sorted({n for c in named for n in c})
    return union, [{i: union.index(n) for i, n in enumerate(c)} for c in named]


class ParquetFiles:
    """Several Parquet files as one source, file after file (each read like ParquetRows, with the same columns)."""

    def __init__(self, urls: list[str], root: str, **options) -> None:
        if not urls:
            raise ValueError(f"no .parquet files in {root}")
        self.parts = [ParquetRows(u, name=_relative(u, root), **options) for u in urls]
        self.classes, self._remaps = _union_classes(self.parts)
        self._starts = [0]
        for part in self.parts:
            self._starts.append(self._starts[-1] + len(part))

    def __len__(self) -> int:
        return self._starts[-1]

    def keys(self) -> list[str]:
        return [k for part in self.parts for k in part.keys()]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Rows without image bytes (filled while iterating), with their file."""
        return [(key, f"{part.name} {reason}") for part in self.parts for key, reason in part.skipped]

    def item(self, i: int) -> tuple[str, str]:
        p = bisect.bisect_right(self._starts, i) - 1
        return self.parts[p].item(i - self._starts[p])

    def indexed(self) -> Iterator[tuple[int, Sample]]:
        for start, part, remap in zip(self._starts, self.parts, self._remaps):
            for row, sample in part.indexed():
                if remap is not None and sample.label is not None:
                    sample = dataclasses.replace(sample, label=remap[sample.label])
                yield start + row, sample

    def __iter__(self) -> Iterator[Sample]:
        return (sample for _, sample in self.indexed())


def _relative(url: str, root: str) -> str:
    rel = url[len(root):].lstrip("/") if url.startswith(root) else ""
    return rel or os.path.basename(url.rstrip("/"))


def find_parquet(src: str) -> tuple[list[str], str] | None:
    """(the Parquet files SRC names, the root their names are relative to), or None when SRC is no Parquet
    source: SRC is a .parquet file, a glob of them (data/train-*.parquet), or a folder holding .parquet files
    and no images or .tar shards (searched recursively). Local paths or fsspec URLs."""
    fs, path = fsspec.core.url_to_fs(src)
    full = (lambda p: fs.unstrip_protocol(p)) if "://" in src else (lambda p: p)
    if _GLOB & set(path):
        root = path[:min(path.index(c) for c in _GLOB if c in path)].rpartition("/")[0]
        files = sorted(p for p in fs.glob(path) if p.lower().endswith(PARQUET_EXTENSIONS))
        if not files:
            raise ValueError(f"no .parquet files match {src}")
        return [full(p) for p in files], full(root)
    if path.lower().endswith(PARQUET_EXTENSIONS):
        return [src], src
    if "://" not in src and not os.path.isdir(src):
        return None
    if "://" in src and not fs.isdir(path):
        return None
    files = []
    for name in (_walk_local(src) if "://" not in src else sorted(fs.find(path))):
        low = name.lower()
        if low.endswith(IMAGE_EXTENSIONS + (".tar",)):
            return None  # an image folder or a folder of shards
        if low.endswith(PARQUET_EXTENSIONS):
            files.append(name)
    root = src.rstrip("/") if "://" not in src else path.rstrip("/")
    return ([full(p) for p in files], full(root)) if files else None


def _walk_local(root: str) -> Iterator[str]:
    """Files under root (hidden ones left out), folder by folder in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield os.path.join(dirpath, name)
