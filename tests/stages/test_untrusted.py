"""Untrusted artifacts through the CLI: checkpoints, encoder weights and run folders from strangers run no code,
and `dede sql` cannot write a file, attach a database, load an extension or read outside the run's files.

The library-level checks are in test_checkpoint.py, test_encoders.py and test_sql.py; these add what a user
meets at the command line (exit code 2, a message, and nothing created).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dede_core.detector.checkpoint import CheckpointError, load_detector, save_checkpoint
from dede_core.detector.config import cpu
from dede_core.detector.encoders import cifar_resnet18, load_encoder
from dede_core.detector.model import DeDe
from dede_core.sql import connect
from flows.cli import main
from test_select import scores_fixture

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
SCORE = ["--workers", "0", "--batch-size", "16", "--chunk", "8", "--knn-k", "3", "--device", "cpu"]


class Exploit:
    """Unpickling this runs a shell command: what a hostile checkpoint or weights file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def files(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, image_folder) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "shards"
    assert main(["shard", str(image_folder), "--out", str(out), "--samples-per-shard", "24"]) == 0
    return out


def detector_for(encoder, path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, model=DeDe(config=cpu(**TINY), global_dim=encoder.dim), encoder_spec=encoder.spec,
                    encoder_fingerprint=encoder.fingerprint)
    return path


def test_a_checkpoint_never_makes_dede_import_and_run_code(tmp_path, shards, monkeypatch, capsys):
    """A detector naming a `callable:` encoder would import a module of the stranger's choosing (any file on
    sys.path, e.g. the working folder) and call it; dede refuses unless the user names that encoder."""
    marker, module = tmp_path / "ran", "dede_planted_encoder"
    (tmp_path / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()  # runs on import\n"
        "import torch\nfrom dede_core.detector.encoders import cifar_resnet18\n\n"
        "def build():\n    torch.manual_seed(0)\n    return cifar_resnet18(width=8)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = f"callable:{module}:build?size=32"
    try:
        evil = detector_for(load_encoder(spec), tmp_path / "detector.pt")  # the stranger's own machine
    finally:
        sys.modules.pop(module, None)
    marker.unlink()

    out = tmp_path / "scores"
    assert main(["score", str(shards), "--detector", str(evil), "--out", str(out), *SCORE]) == 2
    assert "runs Python code" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="runs Python code"):
        load_detector(evil)
    assert main(["info", str(evil)]) == 0 and spec in capsys.readouterr().out  # looking is safe
    assert not marker.exists() and module not in sys.modules and not out.exists()
    try:  # the user names the encoder: their choice to run it
        assert main(["score", str(shards), "--detector", str(evil), "--out", str(out), "--encoder", spec, *SCORE]) == 0
        assert marker.exists()
    finally:
        sys.modules.pop(module, None)


def test_pickled_code_in_any_artifact_is_refused_by_the_cli(tmp_path, shards, image_folder, encoder_spec, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "dede-detector/1", "state_dict": {"w": torch.zeros(1)}, "x": Exploit(marker)}, evil)
    weights = tmp_path / "evil_weights.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "x": Exploit(marker)}, weights)
    train = ["train", str(image_folder), "--epochs", "1", "--workers", "0", "--threads", "1"]
    planted_detector, planted_cache = tmp_path / "run1", tmp_path / "run2"
    planted_detector.mkdir()
    shutil.copy(evil, planted_detector / "detector.pt")  # a stranger's file in the run folder: never resumed
    planted_cache.mkdir()
    shutil.copy(evil, planted_cache / "aux_cache.pt")
    runs = [
        ["score", str(shards), "--detector", str(evil), "--out", str(tmp_path / "scores"), *SCORE],
        ["info", str(evil)],
        train + ["--encoder", f"cifar-resnet18?width=8&weights={weights}", "--out", str(tmp_path / "run0")],
        train + ["--encoder", encoder_spec, "--out", str(planted_detector)],
        train + ["--encoder", encoder_spec, "--out", str(planted_cache)],
    ]
    for argv in runs:
        before = files(tmp_path)
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "refused" in err and "pickled" in err, err
        assert not marker.exists(), f"{argv[0]} ran the pickled payload"
        assert files(tmp_path) - before <= {str(tmp_path / "run0")}  # at most the empty run folder


def test_tampered_detector_and_swapped_encoder_weights_are_refused(tmp_path, shards, encoder_weights, capsys):
    own = tmp_path / "enc.pt"
    shutil.copy(encoder_weights, own)
    path = detector_for(load_encoder(f"cifar-resnet18?width=8&weights={own}"), tmp_path / "detector.pt")
    argv = ["score", str(shards), "--out", str(tmp_path / "scores"), *SCORE]
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["decoder_pred.bias"] += 0.01
    torch.save(payload, tmp_path / "tampered.pt")
    assert main(argv + ["--detector", str(tmp_path / "tampered.pt")]) == 2
    assert "content check" in capsys.readouterr().err

    other = tmp_path / "other.pt"  # the same architecture, other weights
    torch.manual_seed(99)
    torch.save(cifar_resnet18(width=8).state_dict(), other)
    assert main(argv + ["--detector", str(path), "--encoder", f"cifar-resnet18?width=8&weights={other}"]) == 2
    assert "trained on weights" in capsys.readouterr().err
    shutil.copy(other, own)  # the detector's own encoder file, replaced on disk
    assert main(argv + ["--detector", str(path)]) == 2
    assert "trained on weights" in capsys.readouterr().err and not (tmp_path / "scores").exists()


@pytest.fixture()
def run(tmp_path, monkeypatch) -> dict[str, Path]:
    """A scores folder, a Parquet file and a secret next to it, and DuckDB's default temp folder (./.tmp)
    holding a file, in the working directory."""
    scores = tmp_path / "scores"
    scores_fixture(str(scores))
    (scores / "notes.txt").write_text("not one of the views' files")
    pq.write_table(pa.table({"secret": ["outside"]}), tmp_path / "outside.parquet")
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.txt").write_text("in DuckDB's temp folder")
    monkeypatch.chdir(tmp_path)
    return {"tmp": tmp_path, "scores": scores}


ATTACKS = [
    "ATTACH '{tmp}/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{tmp}/evil.duckdb_extension'",
    "EXPORT DATABASE '{tmp}/export'",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_parquet('{tmp}/outside.parquet')",
    "SELECT * FROM read_parquet('{scores}/../outside.parquet')",
    "SELECT * FROM read_text('{scores}/notes.txt')",
    "SELECT * FROM glob('{scores}/*')",
    "SELECT * FROM query('SELECT * FROM read_text(''/etc/hostname'')')",
    "SELECT * FROM read_text('.tmp/secret.txt')",
    "SELECT * FROM glob('{tmp}/.tmp/*')",
    "EXPLAIN ANALYZE COPY scores TO '{tmp}/stolen.csv'",
    "EXPLAIN ANALYZE COPY scores TO '.tmp/stolen.csv'",
    "EXPLAIN (ANALYZE, FORMAT json) COPY scores TO '.tmp/stolen.json'",
    "EXPLAIN /* x */ ANALYSE CREATE TABLE t AS SELECT * FROM scores",
    "EXPLAIN ANALYZE DROP VIEW scores",
    "SET temp_directory = '{tmp}'",
    "PRAGMA enable_profiling = 'json'",
    "CALL pragma_version()",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_dede_sql_refuses(run, attack, capsys):
    before = {p: p.read_bytes() for p in run["tmp"].rglob("*") if p.is_file()}
    query = attack.format(tmp=run["tmp"], scores=run["scores"])
    assert main(["sql", str(run["scores"]), query]) == 2
    assert capsys.readouterr().err.startswith("dede sql: error:")
    assert {p: p.read_bytes() for p in run["tmp"].rglob("*") if p.is_file()} == before  # nothing written


def test_dede_sql_still_explains_and_profiles_reads(run, capsys):
    for query in ("EXPLAIN SELECT count(*) FROM scores", "EXPLAIN ANALYZE SELECT count(*) FROM scores",
                  "EXPLAIN (ANALYZE) WITH s AS (SELECT * FROM scores) SELECT count(*) FROM s"):
        assert main(["sql", str(run["scores"]), query]) == 0, capsys.readouterr().err


def test_the_locked_connection_has_no_temp_folder_to_read_or_write(run):
    """Even a statement that gets past run_query cannot use DuckDB's temp folder (./.tmp by default)."""
    import duckdb

    conn = connect(run["scores"])
    try:
        for statement in ("COPY scores TO '.tmp/stolen.csv'", "SELECT * FROM read_text('.tmp/secret.txt')"):
            with pytest.raises(duckdb.Error):
                conn.execute(statement)
    finally:
        conn.close()
    assert sorted(os.listdir(run["tmp"] / ".tmp")) == ["secret.txt"]
