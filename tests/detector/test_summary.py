"""`dede info`: a short summary for people, every field behind --json."""

from __future__ import annotations

import dataclasses
import json

from dede_core.detector.checkpoint import load_checkpoint
from dede_core.detector.summary import checkpoint_record, describe_checkpoint
from flows.cli import main


def test_summary_names_encoder_sizes_training_health_and_hash(tiny_detector):
    ckpt = load_checkpoint(tiny_detector)
    text = describe_checkpoint(ckpt, path=tiny_detector)
    lines = text.splitlines()
    assert len(lines) < 25 and all(len(line) < 400 for line in lines)  # short, no loss history
    health = "detector health" if ckpt.meta["health"]["passed"] else "WARNING"
    for expected in (ckpt.encoder_spec, ckpt.encoder_fingerprint, f"content hash {ckpt.content_hash}",
                     f"{ckpt.config.img_size} px, patch {ckpt.config.patch_size}", "1 (of 1 asked for)",
                     "stopped", "best epoch", "tiny", health):
        assert expected in text, expected
    params = next(line for line in lines if "parameters" in line).split()[-1]
    assert int(params.replace(",", "")) > 0


def test_an_unfinished_run_says_how_to_resume(tiny_detector):
    ckpt = load_checkpoint(tiny_detector)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("stopped", "best_epoch", "health")} | {"complete": False}
    text = describe_checkpoint(dataclasses.replace(ckpt, meta=meta, train_state={"optimizer": {}}))
    assert "not finished: rerun" in text and "health: not measured" in text and "best epoch" not in text


def test_cli_info_prints_the_summary_and_json_on_request(tiny_detector, capsys):
    assert main(["info", tiny_detector]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"detector {tiny_detector}") and "loss_history" not in out
    assert main(["info", "--json", tiny_detector]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads(json.dumps(checkpoint_record(load_checkpoint(tiny_detector))))
    assert record["meta"]["loss_history"] and record["views"]["detector"].startswith("reconstructs")
