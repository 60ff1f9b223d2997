"""The load-time filtering example trains on exactly the samples of the cleaned copy."""

from __future__ import annotations

import os
import runpy

from test_verdicts import cleaned_keys, make_run

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "finetune_filtered.py")


def test_probe_trains_on_the_kept_set(tmp_path, image_folder, tiny_detector, encoder_spec, capsys):
    run = make_run(str(image_folder), str(tmp_path / "run"), tiny_detector)
    example = runpy.run_path(EXAMPLE)
    result = example["finetune"](run, encoder_spec, epochs=2, batch_size=8)
    assert sorted(result["keys"]) == sorted(cleaned_keys(os.path.join(run, "clean")))  # no duplicates either
    assert len(result["losses"]) == 2 and all(v > 0 for v in result["losses"])

    assert example["main"]([run, "--encoder", encoder_spec, "--epochs", "1"]) == 0
    assert f"trained on {len(result['keys'])} kept samples" in capsys.readouterr().out
