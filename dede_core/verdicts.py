"""The verdicts of a clean run, for training code: which samples dede kept, and where each one came from.

A team about to fine-tune often wants its loader to skip what dede dropped rather than a cleaned copy. Each
helper here reads a run's verdicts once, on first use (so it can be built at import time, pickled into
DataLoader workers, and pointed at an fsspec URL):

    Verdicts(run)                       the kept and rejected tables (key, shard, source, ...)
    webdataset_filter(run)              predicate for webdataset.WebDataset(urls).select(...)
    KeptFiles(dataset, run)             a torch Dataset of files (or torchvision ImageFolder) less what was dropped
    filter_hf_dataset(dataset, run)     a Hugging Face datasets.Dataset less what was dropped, by key column

RUN is a `dede sanitize` run folder (RUN/clean, RUN/scores) or a `dede clean` output folder (its summary.json
names the scores folder). The kept set is the scores table less rejected.parquet: exactly the samples of the
cleaned shards, and available without them (`dede clean --no-copy`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dede_core.io import storage
from dede_core.io.sources import clean_key
from dede_core.sql import scores_files
from schemas import names
from schemas.manifest import read_manifest
from schemas.tables import REJECTED, SCORES, STATUS_SKIPPED, conform

KEPT_COLUMNS = ("key", "shard", "source", "label", "score")  # `dede keys` and Verdicts.kept()


def _locate(run: str) -> tuple[str, str, dict[str, Any]]:
    """(clean folder, scores folder, summary.json) of a sanitize RUN or of a clean folder."""
    for clean in (storage.join(run, names.CLEAN_DIR), run):
        if storage.isfile(storage.join(clean, names.SUMMARY)):
            break
    else:
        raise ValueError(f"{run} holds no dede verdicts (no summary.json, no clean/summary.json): give a "
                         f"`dede sanitize` run folder or a `dede clean` output folder")
    summary = storage.read_json(storage.join(clean, names.SUMMARY))
    beside = storage.join(run, names.SCORES_DIR) if clean != run else None
    for scores in (beside, summary.get("scores_dir")):
        if scores and storage.isdir(scores):
            return clean, scores, summary
    raise ValueError(f"the scores folder of {clean} ({summary.get('scores_dir')}) is not there; the kept set is "
                     f"read from it: move it back, or rerun dede clean")


class Verdicts:
    """What a clean run kept and dropped, read from RUN once, on first use. RUN: local path or fsspec URL."""

    def __init__(self, run: str | os.PathLike) -> None:
        self.run = storage.absolute(run)
        self._tables: dict[str, pa.Table] = {}  # kept, rejected: read on first use
        self._sets: dict[str, frozenset[str]] = {}
        self._shards_dir: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_tables": {}}  # what a DataLoader worker needs is the sets, not the tables

    def _load(self) -> None:
        clean, scores, summary = _locate(self.run)
        with storage.open_read(storage.join(clean, names.REJECTED)) as f:
            rejected = conform(pq.read_table(f), REJECTED)
        parts = []
        for path in scores_files(scores):
            with storage.open_read(path) as f:
                file = pq.ParquetFile(f)
                wanted = [c for c in KEPT_COLUMNS + ("position", "status") if c in file.schema_arrow.names]
                parts.append(file.read(columns=wanted))
        schema = pa.schema([SCORES.field(n) for n in KEPT_COLUMNS + ("position", "status")])
        table = pa.concat_tables([conform(p, schema) for p in parts])
        table = table.filter(pc.not_equal(table.column("status"), STATUS_SKIPPED))
        kept = table.join(rejected.select(["key", "shard"]), keys=["shard", "key"], join_type="left anti")
        kept = kept.sort_by([("shard", "ascending"), ("position", "ascending")]).select(list(KEPT_COLUMNS))
        expected = summary.get("counts", {}).get("kept")
        if expected is not None and kept.num_rows != expected:
            raise ValueError(f"{scores} less {clean}/{names.REJECTED} leaves {kept.num_rows} samples but "
                             f"{clean}/{names.SUMMARY} says {expected} were kept: the scores changed since the "
                             f"clean run; rerun dede clean")
        self._tables, self._shards_dir = {"kept": kept, "rejected": rejected}, summary.get("shards_dir")

    def _table(self, name: str) -> pa.Table:
        if not self._tables:
            self._load()
        return self._tables[name]

    def kept(self) -> pa.Table:
        """One row per kept sample, in shard order: key, shard, source, label, score."""
        return self._table("kept")

    def rejected(self) -> pa.Table:
        """rejected.parquet: key, shard, source, score, reason of every dropped sample."""
        return self._table("rejected")

    def table(self, rejected: bool = False) -> pa.Table:
        """kept(), or rejected() when asked (`dede keys --rejected`)."""
        return self.rejected() if rejected else self.kept()

    def _set(self, name: str, column: str) -> frozenset[str]:
        if name not in self._sets:
            values = self.kept().column(column).to_pylist()
            self._sets[name] = frozenset(v for v in values if v is not None)
        return self._sets[name]

    def kept_keys(self) -> frozenset[str]:
        """The keys of the kept samples (the WebDataset __key__ of RUN/shards)."""
        return self._set("keys", "key")

    def kept_sources(self) -> frozenset[str]:
        """The source references of the kept samples (for a folder corpus: paths relative to it)."""
        return self._set("sources", "source")

    def corpus(self) -> str | None:
        """The corpus the shards were made from (the shards manifest's `source`), when it can be read."""
        if not self._tables:
            self._load()
        for shards in (self._shards_dir, storage.join(self.run, names.SHARDS_DIR)):
            if shards and storage.isfile(storage.join(shards, names.MANIFEST)):
                return read_manifest(shards).source
        return None


def _verdicts(run: str | os.PathLike | Verdicts) -> Verdicts:
    return run if isinstance(run, Verdicts) else Verdicts(run)


class _KeepKey:
    """True for a sample (a dict) whose key dede kept; picklable, reads the verdicts on its first call."""

    def __init__(self, verdicts: Verdicts, key_column: str) -> None:
        self.verdicts, self.key_column = verdicts, key_column

    def __call__(self, sample: dict[str, Any]) -> bool:
        if self.key_column not in sample:
            raise ValueError(f"the sample has no {self.key_column!r} field (fields: {sorted(sample)[:10]})")
        return clean_key(sample[self.key_column]) in self.verdicts.kept_keys()


def webdataset_filter(run: str | os.PathLike | Verdicts) -> Callable[[dict[str, Any]], bool]:
    """A predicate for `webdataset.WebDataset(urls).select(pred)`: keeps the samples dede kept, by `__key__`.
    Works over RUN/shards and over the original WebDataset shards a corpus was sharded from (same keys)."""
    return _KeepKey(_verdicts(run), "__key__")


def filter_hf_dataset(dataset: Any, run: str | os.PathLike | Verdicts, key_column: str = "key",
                      **filter_kwargs: Any) -> Any:
    """`dataset.filter(...)` keeping the rows whose key_column dede kept: for a Hugging Face `datasets.Dataset`
    read from the Parquet files the corpus was sharded from with `--key-column key_column`. filter_kwargs go
    to dataset.filter (e.g. load_from_cache_file=False after cleaning again)."""
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None and key_column not in column_names:
        raise ValueError(f"the dataset has no column {key_column!r} (columns: {column_names}); shard the Parquet "
                         f"files with --key-column naming a column of unique keys, and filter by it")
    return dataset.filter(_KeepKey(_verdicts(run), key_column), **filter_kwargs)


def _file_paths(dataset: Any) -> list[str]:
    samples = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
    if samples is None:
        raise ValueError(f"{type(dataset).__name__} has no `samples` list (as torchvision's ImageFolder has); "
                         f"pass paths=[the file of each index]")
    return [s[0] if isinstance(s, (tuple, list)) else s for s in samples]


class KeptFiles:
    """A map-style dataset of files (torchvision ImageFolder, or any dataset with `paths`) less the files dede
    dropped, matched by path relative to `root` (default: dataset.root, else the corpus the run was sharded
    from) against the kept samples' source references. Files dede never saw are left out too.
    The index is built on first use."""

    def __init__(self, dataset: Any, run: str | os.PathLike | Verdicts, *, root: str | None = None,
                 paths: Sequence[str] | None = None) -> None:
        self.dataset, self.verdicts = dataset, _verdicts(run)
        self.root, self.paths = root, paths
        self._indices: list[int] | None = None

    def indices(self) -> list[int]:
        """The indices into `dataset` that dede kept."""
        if self._indices is None:
            paths = list(self.paths) if self.paths is not None else _file_paths(self.dataset)
            root = self.root or getattr(self.dataset, "root", None) or self.verdicts.corpus()
            if root is None:
                raise ValueError("no root to make the paths relative to: pass root=the corpus folder")
            kept = self.verdicts.kept_sources()
            rel = [os.path.relpath(os.path.abspath(p), os.path.abspath(root)).replace(os.sep, "/") for p in paths]
            self._indices = [i for i, r in enumerate(rel) if r in kept]
        return self._indices

    def __len__(self) -> int:
        return len(self.indices())

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices()[i]]


def write_keys(table: pa.Table, out: str | None = None) -> str:
    """`dede keys`: the table as lines `key<TAB>source` (printed when out is None, else a .txt file), or the
    whole table as .parquet; returns the text or the path written."""
    if out is not None and not out.lower().endswith((".txt", ".parquet")):
        raise ValueError(f"--out {out}: give a file name ending in .txt or .parquet")
    if out is not None and out.lower().endswith(".parquet"):
        storage.write_parquet(out, table)
        return out
    keys, sources = table.column("key").to_pylist(), table.column("source").to_pylist()
    text = "".join(f"{k}\t{'' if s is None else s}\n" for k, s in zip(keys, sources))
    if out is None:
        return text
    storage.write_bytes(out, text.encode("utf-8"))
    return out


