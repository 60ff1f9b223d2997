"""`dede clean` with each rule, `dede sql` (table, CSV, Parquet, writes refused), `dede --help` and sanitize."""

from __future__ import annotations

import json
import os

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from pathlib import Path

from dede_core.detector.config import cpu
from dede_core.stages.score import score_shards
from dede_core.stages.shard import write_shards
from dede_core.io.sources import open_source
from dede_core.detector.train import TrainConfig, train_detector
from flows.cli import main

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
COMMANDS = ["data", "shard", "train", "score", "clean", "sql", "keys", "info", "sanitize"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, image_folder, encoder):
    """48 images in 3 shards, a tiny detector (12 held-out calibration images, a k-NN bank) and their scores."""
    root = tmp_path_factory.mktemp("pipeline")
    shards, scores = root / "shards", root / "scores"
    write_shards(str(image_folder), str(shards), samples_per_shard=20, progress=False)
    detector = train_detector(source=open_source(str(image_folder)), data_id="tiny", encoder=encoder,
                              config=cpu(**TINY), train=TrainConfig(epochs=1, batch_size=16, holdout=12, knn_bank=30),
                              out_dir=root / "detector")
    score_shards(str(shards), detector=str(detector), out_dir=str(scores), knn_k=3, batch_size=16, workers=0,
                 progress=False)
    table = pq.read_table(sorted(scores.glob("[0-9]*.parquet")), columns=["key", "score", "knn_score"])
    return {"shards": str(shards), "scores": str(scores), "detector": str(detector), "table": table.to_pydict()}


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


RULES = {  # name -> (options, column compared with the threshold)
    "fpr-0.05": (["--fpr", "0.05"], "score"),
    "fpr": (["--fpr", "0.25"], "score"),
    "quantile": (["--quantile", "0.75"], "score"),
    "quantile-knn": (["--quantile", "0.75", "--column", "knn_score"], "knn_score"),
    "threshold": (["--threshold", "MEDIAN"], "score"),
    "where": (["--where", "score > MEDIAN"], "score"),
}


@pytest.mark.parametrize("name", list(RULES))
def test_clean_with_each_rule(name, scored, tmp_path, capsys):
    options, column = RULES[name]
    cut = median(scored["table"]["score"])
    options = [o.replace("MEDIAN", repr(cut)) for o in options]
    out = tmp_path / "clean"
    report = name == "fpr-0.05"  # one report is enough: it is tested in test_report
    args = ["clean", "--allow-weak-detector", scored["shards"], "--scores", scored["scores"], "--out", str(out), *options]
    assert main(args + ([] if report else ["--no-report"])) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    threshold = cut if name == "where" else summary["threshold"]
    if name in ("threshold", "where"):
        assert threshold == cut
    values = dict(zip(scored["table"]["key"], scored["table"][column]))
    expected = {k for k, v in values.items() if v > threshold}
    rejected = set(pq.read_table(out / "rejected.parquet").column("key").to_pylist())
    assert rejected == expected and 0 < len(rejected) < 48
    assert summary["counts"] == {"total": 48, "kept": 48 - len(expected), "dropped": len(expected), "unscored": 0}
    assert f"kept {48 - len(expected)} of 48 samples, dropped {len(expected)}" in printed
    assert summary["how"] in printed
    assert (out / "report.html").is_file() == report
    if name.endswith("fpr"):
        assert "held-out calibration" in summary["how"] and "chosen without labels" in summary["how"]


def test_clean_by_default_is_the_combined_verdict(scored, tmp_path, capsys):
    out = tmp_path / "clean"
    args = ["clean", "--allow-weak-detector", scored["shards"], "--scores", scored["scores"], "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"] == {"kind": "fdr", "value": 0.05, "column": None, "allow_weak_detector": True}
    verdict = pq.read_table(out / "verdict.parquet")
    assert verdict.num_rows == 48 and {"p_dede", "p_aux_distance", "p_combined", "q_value"} <= set(verdict.column_names)
    flagged = {k for k, v in zip(verdict.column("key").to_pylist(), verdict.column("verdict").to_pylist()) if v}
    assert set(pq.read_table(out / "rejected.parquet").column("key").to_pylist()) == flagged
    assert summary["verdict"]["flagged"] == len(flagged) and summary["how"] in printed
    assert "What was found" in (out / "report.html").read_text()


def test_clean_refuses_bad_rule_options(scored, tmp_path, capsys):
    base = ["clean", "--allow-weak-detector", scored["shards"], "--scores", scored["scores"], "--out", str(tmp_path / "c"), "--no-report"]
    assert main(base + ["--where", "score > 1", "--column", "knn_score"]) == 2
    assert "--column does not apply to --where" in capsys.readouterr().err
    assert main(base + ["--fpr", "1.5"]) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # two rules at once: argparse refuses
        main(base + ["--fpr", "0.1", "--quantile", "0.9"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_sql_prints_a_table(scored, capsys):
    assert main(["sql", scored["scores"], "SELECT status, count(*) AS n FROM scores GROUP BY status"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["status", "n"] and "ok      48" in out and "(1 row)" in out


def test_sql_writes_csv_and_parquet(scored, tmp_path, capsys):
    query = "SELECT key, score FROM scores ORDER BY score DESC, key"
    for name in ("top.csv", "top.parquet"):
        assert main(["sql", scored["scores"], query, "--out", str(tmp_path / name)]) == 0
        assert f"48 rows -> {tmp_path / name}" in capsys.readouterr().out
    from_csv, from_parquet = pacsv.read_csv(tmp_path / "top.csv"), pq.read_table(tmp_path / "top.parquet")
    assert from_csv.column("key").to_pylist() == from_parquet.column("key").to_pylist()
    assert from_parquet.column("score").to_pylist() == sorted(scored["table"]["score"], reverse=True)


def test_sql_joins_rejected_and_manifest(scored, tmp_path, capsys):
    clean = tmp_path / "clean"
    assert main(["clean", "--allow-weak-detector", scored["shards"], "--scores", scored["scores"], "--out", str(clean), "--quantile", "0.5",
                 "--no-report"]) == 0
    capsys.readouterr()
    query = ("SELECT (SELECT count(*) FROM rejected) AS dropped, (SELECT sum(samples) FROM manifest) AS samples, "
             "(SELECT count(*) FROM scores WHERE key NOT IN (SELECT key FROM rejected)) AS kept")
    assert main(["sql", scored["scores"], query, "--rejected", str(clean), "--shards", scored["shards"]]) == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["24", "48", "24"]


@pytest.mark.parametrize("query", ["COPY scores TO 'OUT'", "CREATE TABLE t AS SELECT 1",
                                   "SELECT * FROM read_csv('OUT')", "SELECT 1; SELECT 2"])
def test_sql_refuses_writes(query, scored, tmp_path, capsys):
    target = tmp_path / "stolen.csv"
    target_query = query.replace("OUT", str(target))
    assert main(["sql", scored["scores"], target_query]) == 2
    assert capsys.readouterr().err.startswith("dede sql: error:")
    assert not target.exists()


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    listed = capsys.readouterr().out
    assert all(f"\n    {c} " in listed for c in COMMANDS), listed
    import dede_core

    assert not any(p.name == "cli.py" for p in Path(dede_core.__file__).parent.rglob("*.py"))  # one CLI only


@pytest.mark.parametrize("command", ["sanitize", "clean", "sql"])
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert {"sanitize": "RUN/sanitize.json", "clean": "OUT/rejected.parquet", "sql": "calibration"}[command] in text


def test_cli_sanitize_with_a_given_detector(scored, image_folder, encoder_spec, tmp_path, capsys, prefect_harness):
    run = tmp_path / "run"
    args = ["sanitize", "--allow-weak-detector", str(image_folder), "--encoder", encoder_spec, "--out", str(run), "--detector",
            scored["detector"], "--samples-per-shard", "20", "--quantile", "0.9", "--knn-k", "3", "--batch-size", "16",
            "--workers", "0", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kept 43 of 48 samples, dropped 5" in out and str(run / "sanitize.json") in out
    record = json.loads((run / "sanitize.json").read_text())
    assert not (run / "detector").exists() and set(record["timings"]) == {"shard", "score", "neighbours", "clean"}
    # the same scores as the module's own scoring of the same shards with the same detector
    for name in ("000000.parquet", "000001.parquet", "000002.parquet"):
        assert pq.read_table(run / "scores" / name).equals(pq.read_table(f"{scored['scores']}/{name}"))


def test_a_slow_temporary_prefect_server_gets_time_a_retry_and_a_message_naming_the_setting(monkeypatch, capsys):
    from flows import cli as flows_cli

    monkeypatch.delenv(flows_cli.STARTUP_SETTING, raising=False)
    flows_cli.hold_on_busy_machine()
    assert os.environ[flows_cli.STARTUP_SETTING] == str(flows_cli.STARTUP_DEFAULT_S)
    monkeypatch.setenv(flows_cli.STARTUP_SETTING, "7")
    flows_cli.hold_on_busy_machine()
    assert os.environ[flows_cli.STARTUP_SETTING] == "7"  # the user's own setting wins

    calls = []

    def slow_then_up(x):
        calls.append(x)
        if len(calls) == 1:
            raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")
        return x

    assert flows_cli.run_flow("score", slow_then_up, 3) == 3 and calls == [3, 3]
    assert "trying once more" in capsys.readouterr().err

    def never_up():
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    with pytest.raises(ValueError, match=f"{flows_cli.STARTUP_SETTING}.*dede sanitize"):
        flows_cli.run_flow("sanitize", never_up)
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not retried
        flows_cli.run_flow("sanitize", lambda: (_ for _ in ()).throw(RuntimeError("something else")))


@pytest.mark.parametrize("argv", [["sanitize", "src", "--encoder", "e", "--out", "s3://bucket/run"],
                                  ["sanitize", "src", "--encoder", "e", "--out", "s3:bucket"],
                                  ["train", "src", "--encoder", "e", "--out", "gs://bucket/t"],
                                  ["shard", "src", "--out", "s3:bucket/shards"]])
def test_an_out_url_a_command_cannot_write_is_refused(argv, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "URL" in err and "--out" in err or "is a URL" in err, err
    assert not list(tmp_path.iterdir())  # no local folder named s3: or gs:
