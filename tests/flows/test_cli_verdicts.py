"""The verdicts from the command line, as a new user runs them: a Hugging Face style Parquet corpus, `dede clean
--no-copy`, `dede keys`, `dede sql --html/--export-images`, `dede sanitize` with the Parquet options."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from flows.cli import main
from test_verdicts import cleaned_keys, parquet_files


@pytest.fixture(scope="module")
def hf_scored(tmp_path_factory, tiny_detector):
    """data/train-*.parquet (24 rows, an `id` column) sharded and scored through the CLI."""
    root = tmp_path_factory.mktemp("hf")
    parquet_files(root / "hf")
    source = str(root / "hf" / "data" / "train-*.parquet")
    assert main(["shard", source, "--out", str(root / "shards"), "--key-column", "id",
                 "--samples-per-shard", "10"]) == 0
    assert main(["score", str(root / "shards"), "--detector", tiny_detector, "--out", str(root / "scores"),
                 "--workers", "0", "--device", "cpu", "--batch-size", "16"]) == 0
    return root


def test_clean_no_copy_then_keys(hf_scored, tmp_path, capsys):
    shards, scores = str(hf_scored / "shards"), str(hf_scored / "scores")
    bare, full = tmp_path / "bare", tmp_path / "full"
    rule = ["--quantile", "0.75", "--allow-weak-detector"]
    assert main(["clean", shards, "--scores", scores, "--out", str(bare), "--no-copy", "--thumbnails", "4", *rule]) == 0
    assert "verdicts only" in capsys.readouterr().out
    assert not list(bare.glob("*.tar")) and (bare / "report.html").is_file()
    assert len(list((bare / "report_images").iterdir())) == 4
    assert main(["clean", shards, "--scores", scores, "--out", str(full), *rule]) == 0
    capsys.readouterr()

    assert main(["keys", str(bare)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split("\t")[0] for line in lines} == cleaned_keys(str(full))  # the same set as the copy
    assert all(line.split("\t")[1].startswith("train-0000") and "#row=" in line for line in lines)
    assert main(["keys", str(bare), "--rejected", "--out", str(tmp_path / "dropped.parquet")]) == 0
    dropped = pq.read_table(tmp_path / "dropped.parquet")
    assert dropped.num_rows == 24 - len(lines) and dropped.column("source").null_count == 0
    assert main(["keys", str(tmp_path)]) == 2 and "no dede verdicts" in capsys.readouterr().err

    done = subprocess.run([sys.executable, "-m", "flows.cli", "keys", str(full), "--out", str(tmp_path / "k.txt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k.txt").read_text().splitlines() == lines


def test_sql_html_and_export_images(hf_scored, tmp_path, capsys):
    query = "SELECT key, score FROM scores ORDER BY score DESC LIMIT 5"
    page, folder = tmp_path / "top.html", tmp_path / "look"
    assert main(["sql", str(hf_scored / "scores"), query, "--shards", str(hf_scored / "shards"),
                 "--html", str(page), "--export-images", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"page -> {page}" in out and f"5 images -> {folder}" in out
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 5 and "#row=" in text
    assert sorted(os.listdir(folder))[0].startswith("0000-") and len(os.listdir(folder)) == 5
    assert len(os.listdir(tmp_path / "top_images")) == 5  # the full-size images the thumbnails link to
    assert main(["sql", str(hf_scored / "scores"), "SELECT score FROM scores", "--html", str(page),
                 "--shards", str(hf_scored / "shards")]) == 2
    assert "no `key` column" in capsys.readouterr().err


def test_sanitize_reads_parquet_columns_and_writes_verdicts_only(tmp_path, tiny_detector, encoder_spec, capsys,
                                                                prefect_harness):
    parquet_files(tmp_path / "hf")
    run = tmp_path / "run"
    args = ["sanitize", str(tmp_path / "hf"), "--encoder", encoder_spec, "--out", str(run), "--detector",
            tiny_detector, "--key-column", "id", "--label-column", "label", "--no-copy", "--thumbnails", "2",
            "--quantile", "0.8", "--allow-weak-detector", "--samples-per-shard", "10", "--batch-size", "16",
            "--workers", "0", "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    assert not list((run / "clean").glob("*.tar")) and len(os.listdir(run / "report_images")) == 2
    assert main(["keys", str(run)]) == 0
    keys = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    summary = json.loads((run / "clean" / "summary.json").read_text())
    assert summary["copied"] is False and summary["counts"]["dropped"] == 5  # quantile 0.8 of 24 scores
    assert len(keys) == 24 - 5 and all(k.startswith("img-") and s.startswith("data/train-") for k, s in keys)
