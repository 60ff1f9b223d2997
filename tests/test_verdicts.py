"""Verdicts for training code: source references in the tables, the kept set without a copy, and the filters
for WebDataset, torch file datasets and Hugging Face datasets giving exactly the cleaned copy's samples."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from dede_core import KeptFiles, Verdicts, filter_hf_dataset, webdataset_filter
from dede_core.sql import connect, run_query
from dede_core.io.tarspans import index_tar
from dede_core.stages.clean import clean
from dede_core.stages.score import score_shards
from dede_core.stages.select import Rule
from dede_core.stages.shard import update_shards
from dede_core.verdicts import write_keys

RULE = dataclasses.replace(Rule.quantile(0.75), allow_weak_detector=True)  # the tiny detector is weak


def make_run(src: str, run: str, detector: str, *, copy: bool = True, **shard_options) -> str:
    """RUN/shards, RUN/scores, RUN/clean as `dede sanitize` lays them out (no Prefect: the stage functions)."""
    update_shards(src, os.path.join(run, "shards"), samples_per_shard=20, progress=False, **shard_options)
    score_shards(os.path.join(run, "shards"), detector=detector, out_dir=os.path.join(run, "scores"), batch_size=16,
                 workers=0, progress=False)
    clean(os.path.join(run, "shards"), os.path.join(run, "scores"), os.path.join(run, "clean"), RULE,
          progress=False, copy=copy)
    return run


def cleaned_keys(clean_dir: str) -> set[str]:
    names = sorted(n for n in os.listdir(clean_dir) if n.endswith(".tar"))
    return {s.key for n in names for s in index_tar(os.path.join(clean_dir, n)).samples}


@pytest.fixture(scope="module")
def run(tmp_path_factory, image_folder, tiny_detector) -> str:
    return make_run(str(image_folder), str(tmp_path_factory.mktemp("run")), tiny_detector)


def test_scores_and_rejected_carry_the_source_path(run, image_folder):
    files = {os.path.relpath(os.path.join(d, f), image_folder) for d, _, fs in os.walk(image_folder) for f in fs}
    conn = connect(os.path.join(run, "scores"), rejected=os.path.join(run, "clean"))
    try:
        scores = run_query(conn, "SELECT key, source FROM scores").to_pylist()
        rejected = run_query(conn, "SELECT key, source FROM rejected").to_pylist()
    finally:
        conn.close()
    assert {r["source"] for r in scores} == files  # image folder: the path relative to the corpus
    assert all(r["key"] == os.path.splitext(r["source"])[0] for r in scores)
    assert rejected and all(r["source"] in files for r in rejected)


def test_kept_set_is_the_cleaned_copy_and_needs_no_copy(run, tmp_path, image_folder, tiny_detector):
    verdicts = Verdicts(run)
    kept = cleaned_keys(os.path.join(run, "clean"))
    assert set(verdicts.kept_keys()) == kept and verdicts.kept().num_rows == len(kept)
    assert set(verdicts.rejected().column("key").to_pylist()).isdisjoint(kept)
    assert Verdicts(os.path.join(run, "clean")).kept_keys() == verdicts.kept_keys()  # a clean folder works too

    bare = make_run(str(image_folder), str(tmp_path / "bare"), tiny_detector, copy=False)
    listing = sorted(os.listdir(os.path.join(bare, "clean")))
    assert not [n for n in listing if n.endswith(".tar")] and "manifest.json" not in listing
    assert {"rejected.parquet", "summary.json"} <= set(listing)
    assert Verdicts(bare).kept_keys() == verdicts.kept_keys()
    with pytest.raises(ValueError, match="copy"):  # the same folder cannot turn into a copy silently
        clean(os.path.join(bare, "shards"), os.path.join(bare, "scores"), os.path.join(bare, "clean"), RULE,
              progress=False)


def test_webdataset_predicate_keeps_the_cleaned_samples(run):
    urls = sorted(os.path.join(run, "shards", n) for n in os.listdir(os.path.join(run, "shards"))
                  if n.endswith(".tar"))
    predicate = pickle.loads(pickle.dumps(webdataset_filter(run)))  # as a DataLoader worker gets it
    seen = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False).select(predicate)]
    assert set(seen) == cleaned_keys(os.path.join(run, "clean")) and len(seen) == len(set(seen))


def test_kept_files_filters_an_image_folder(run, image_folder):
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(image_folder))
    kept = KeptFiles(dataset, run)
    assert kept._indices is None  # nothing read until it is used
    paths = {os.path.splitext(os.path.relpath(dataset.samples[i][0], image_folder))[0] for i in kept.indices()}
    assert paths == cleaned_keys(os.path.join(run, "clean")) and len(kept) == len(paths)
    image, label = kept[0]
    assert isinstance(image, Image.Image) and label in (0, 1)
    with pytest.raises(ValueError, match="paths="):
        len(KeptFiles([1, 2, 3], run))


class FakeHFDataset:
    """What filter_hf_dataset needs of datasets.Dataset: column_names and filter(fn) over row dicts."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows, self.column_names = rows, list(rows[0])

    def filter(self, fn, **kwargs) -> FakeHFDataset:
        return FakeHFDataset([r for r in self.rows if fn(r)])


def parquet_files(folder, n: int = 24) -> list[dict]:
    """Two Parquet files of PNG rows (the Hugging Face data/train-*.parquet layout) with an `id` key column."""
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (10 * i, 255 - 10 * i, (37 * i) % 256)).save(buf, format="PNG")
        rows.append({"id": f"img-{i:03d}", "image": {"bytes": buf.getvalue(), "path": None}, "label": i % 3})
    data = folder / "data"
    data.mkdir(parents=True)
    half = n // 2
    for part, chunk in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(chunk), data / f"train-{part:05d}-of-00002.parquet")
    (folder / "README.md").write_text("a dataset card\n")
    return rows


def test_parquet_folder_source_and_hf_filter(tmp_path, tiny_detector):
    rows = parquet_files(tmp_path / "hf")
    run = make_run(str(tmp_path / "hf" / "data" / "train-*.parquet"), str(tmp_path / "run"), tiny_detector,
                   key_column="id")
    table = Verdicts(run).kept()
    assert table.num_rows == len(cleaned_keys(os.path.join(run, "clean")))
    sources = dict(zip(table.column("key").to_pylist(), table.column("source").to_pylist()))
    assert sources["img-013"] == "train-00001-of-00002.parquet#row=1"
    kept = filter_hf_dataset(FakeHFDataset([{"id": r["id"], "label": r["label"]} for r in rows]), run,
                             key_column="id")
    assert {r["id"] for r in kept.rows} == set(table.column("key").to_pylist())
    with pytest.raises(ValueError, match="no column 'key'"):
        filter_hf_dataset(FakeHFDataset(rows), run)

    whole = make_run(str(tmp_path / "hf"), str(tmp_path / "run-folder"), tiny_detector, key_column="id")
    assert Verdicts(whole).kept().column("source").to_pylist()[0].startswith("data/train-00000-of-00002.parquet#")


def test_older_scores_without_source_still_load(run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run, old)
    for name in os.listdir(old / "scores"):
        if name.endswith(".parquet") and name != "calibration.parquet":
            table = pq.read_table(old / "scores" / name)
            pq.write_table(table.drop_columns(["source"]), old / "scores" / name)
    kept = Verdicts(str(old)).kept()
    assert kept.num_rows == Verdicts(run).kept().num_rows and kept.column("source").null_count == kept.num_rows
    conn = connect(str(old / "scores"))
    try:
        assert run_query(conn, "SELECT count(source) AS n FROM scores").to_pylist() == [{"n": 0}]
    finally:
        conn.close()


def test_write_keys_text_and_parquet(run, tmp_path):
    verdicts = Verdicts(run)
    text = write_keys(verdicts.kept())
    lines = text.splitlines()
    assert len(lines) == verdicts.kept().num_rows and all(len(line.split("\t")) == 2 for line in lines)
    out = write_keys(verdicts.table(rejected=True), str(tmp_path / "dropped.parquet"))
    assert pq.read_table(out).column("key").to_pylist() == verdicts.rejected().column("key").to_pylist()
    with pytest.raises(ValueError, match=".txt or .parquet"):
        write_keys(verdicts.kept(), str(tmp_path / "keys.csv"))


def test_verdicts_from_an_fsspec_url(run):
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("clean/summary.json", "clean/rejected.parquet"):
        fs.pipe(f"/verdicts/run/{name}", open(os.path.join(run, name), "rb").read())
    for name in os.listdir(os.path.join(run, "scores")):
        if name.endswith(".parquet") or name.endswith(".json"):
            fs.pipe(f"/verdicts/run/scores/{name}", open(os.path.join(run, "scores", name), "rb").read())
    remote = Verdicts("memory://verdicts/run")
    assert remote.kept_keys() == Verdicts(run).kept_keys()
    predicate = webdataset_filter("memory://verdicts/run")
    assert predicate({"__key__": sorted(remote.kept_keys())[0]}) and not predicate({"__key__": "no-such-key"})
