import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from dede_core.detector.checkpoint import load_checkpoint
from flows.cli import main
from dede_core.detector.config import cpu
from dede_core.io.sources import open_source
from dede_core.detector.train import TrainConfig, train_detector
from conftest import on_dede_log

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def _train(folder, encoder, out, epochs, log=lambda line: None, **train):
    source = open_source(str(folder))
    with on_dede_log(log):
        return train_detector(source=source, data_id="tiny", encoder=encoder, config=cpu(**TINY),
                              train=TrainConfig(epochs=epochs, batch_size=16, **train), out_dir=out)


def _interrupt_after_epoch_1(line):
    if line.startswith("epoch 1/"):
        raise KeyboardInterrupt


def test_resumed_training_equals_uninterrupted(tmp_path, image_folder, encoder):
    straight = load_checkpoint(_train(image_folder, encoder, tmp_path / "a", epochs=3))
    with pytest.raises(KeyboardInterrupt):
        _train(image_folder, encoder, tmp_path / "b", epochs=3, log=_interrupt_after_epoch_1)
    half = load_checkpoint(tmp_path / "b" / "detector.pt")
    assert half.train_state is not None and half.meta["epoch"] == 1
    resumed = load_checkpoint(_train(image_folder, encoder, tmp_path / "b", epochs=3))
    assert resumed.content_hash == straight.content_hash
    assert resumed.meta["loss_history"] == straight.meta["loss_history"]
    assert straight.train_state is None and straight.meta["complete"]


def test_rerun_with_other_settings_is_refused(tmp_path, image_folder, encoder):
    _train(image_folder, encoder, tmp_path / "run", epochs=1)
    with pytest.raises(ValueError, match="lr: 0.001 -> 0.01"):
        _train(image_folder, encoder, tmp_path / "run", epochs=2, lr=1e-2)


def test_finished_run_is_not_retrained(tmp_path, image_folder, encoder):
    path = _train(image_folder, encoder, tmp_path / "run", epochs=1)
    stamp = path.stat().st_mtime_ns
    _train(image_folder, encoder, tmp_path / "run", epochs=1)
    assert path.stat().st_mtime_ns == stamp


def test_cli_train_score_info(tmp_path, image_folder, encoder_spec, capsys):
    out = tmp_path / "run"
    args = ["train", str(image_folder), "--encoder", encoder_spec, "--out", str(out), "--epochs", "2",
            "--batch-size", "16", "--workers", "0"]
    assert main(args) == 0
    shards, scores = tmp_path / "shards", tmp_path / "scores"
    assert main(["shard", str(image_folder), "--out", str(shards), "--samples-per-shard", "20"]) == 0
    assert main(["score", str(shards), "--detector", str(out / "detector.pt"), "--out", str(scores),
                 "--workers", "0", "--batch-size", "10"]) == 0
    table = pq.read_table(sorted(scores.glob("0*.parquet")))
    assert table.num_rows == 48 and set(table.column("status").to_pylist()) == {"ok"}
    assert all(s > 0 for s in table.column("score").to_pylist())
    assert set(table.column("detector_hash").to_pylist()) == {load_checkpoint(out / "detector.pt").content_hash}
    capsys.readouterr()
    assert main(["info", str(out / "detector.pt")]) == 0
    summary = capsys.readouterr().out
    assert re.search(r"epochs +2 \(of 2 asked for\)", summary) and "{" not in summary
    assert load_checkpoint(out / "detector.pt").encoder_spec in summary
    assert main(["info", "--json", str(out / "detector.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["meta"]["epoch"] == 2


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nowhere"), "--encoder", "cifar-resnet18", "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err


def test_ctrl_c_then_rerun_resumes(tmp_path, image_folder, encoder_spec):
    """A real `dede train` process interrupted with SIGINT resumes from its last epoch when rerun."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flows.cli", "train", str(image_folder), "--encoder", encoder_spec,
           "--out", str(out), "--epochs", "400", "--batch-size", "16", "--workers", "0", "--threads", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # SIGINT back to its default in the child, as under a terminal: a test run started in the background passes
    # SIGINT ignored on to its children, and an ignored SIGINT cannot interrupt the run under test.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = out / "detector.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint was written"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    epoch = load_checkpoint(ckpt).meta["epoch"]
    assert 1 <= epoch < 400
    rerun = subprocess.run(cmd[:-8] + ["--epochs", str(epoch + 1)] + cmd[-6:], stderr=subprocess.PIPE,
                           text=True, env=env, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {ckpt} after epoch {epoch}" in rerun.stderr
    assert load_checkpoint(ckpt).meta["epoch"] == epoch + 1


def test_held_out_calibration_set_is_stored_and_order_free(tmp_path, image_folder, encoder):
    from dede_core.detector.aux import split_holdout

    ckpt = load_checkpoint(_train(image_folder, encoder, tmp_path / "run", epochs=1, holdout=10, knn_bank=20))
    assert ckpt.meta["held_out"] == 10 and ckpt.meta["images"] == 38
    assert len(ckpt.calibration_keys) == 10 and ckpt.calibration_images.shape == (10, 3, 32, 32)
    assert ckpt.knn_bank.shape == (20, encoder.dim) and ckpt.knn_bank.dtype == torch.float16
    keys = [f"k{i}" for i in range(30)]
    _, held = split_holdout(keys, 5)
    _, held_reversed = split_holdout(keys[::-1], 5)
    assert {keys[i] for i in held.tolist()} == {keys[::-1][i] for i in held_reversed.tolist()}
    assert len(split_holdout(keys[:4], 5)[1]) == 2  # never more than half
