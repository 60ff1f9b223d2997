"""The detection benchmark's machinery on a tiny configuration (what `dede bench detection --tiny` runs)."""

import json

from bench.common import ArraySource
from bench.detection import run_bench, tiny
from dede_core.io.images import decode_image

from conftest import smooth_images


def test_array_source_round_trips_pixels():
    images = smooth_images(3)
    source = ArraySource(images, "x")
    assert source.keys() == ["x_000000", "x_000001", "x_000002"]
    assert (decode_image(source[1].data, size=32, channels=3) == images[1]).all()


def test_tiny_benchmark_writes_table_json_and_plots(tmp_path):
    report = run_bench(tiny(), tmp_path / "cache", tmp_path / "out", name="detection-tiny")
    (result,) = report["results"]
    assert set(result["victim"]) == {"knn_accuracy", "clean_accuracy", "attack_success_rate"}
    rows = result["rows"]
    for name in ("dede_id v0 k1", "dede_ood v0 k1", "mae_ablation v0 k1", "knn_distance", "slof",
                 "spectral_signature", "dede_id + knn (rank average)"):
        assert 0.0 <= rows[name]["auroc"] <= 1.0, name
    assert 0.0 <= rows["dede_id v0 k1"]["label_free_fpr"] <= 1.0
    assert 0.0 <= rows["dede_id v0 k1, error outside the trigger (diagnostic)"]["auroc"] <= 1.0
    down = result["downstream"]
    assert down["train_images"] == 256 and down["planted"] == 10
    assert down["removed"] == down["removed_planted"] + down["removed_clean"]
    for key in ("clean_accuracy_before", "clean_accuracy_after", "asr_before", "asr_after", "screen_asr"):
        assert 0.0 <= down[key] <= 1.0, key
    saved = json.loads((tmp_path / "out" / "detection-tiny.json").read_text())
    assert saved["results"][0]["rows"].keys() == rows.keys()
    table = (tmp_path / "out" / "detection-tiny.md").read_text()
    assert "| dede_id v0 k1" in table and "ASR" in table and "## Downstream" in table
    assert (tmp_path / "out" / "detection-tiny-roc-badencoder.png").read_bytes()[:4] == b"\x89PNG"
    # Everything is cached by config hash: a second run trains nothing and gives the same numbers.
    again = run_bench(tiny(), tmp_path / "cache", tmp_path / "out2", name="detection-tiny")
    assert again["results"][0]["rows"] == rows
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "results").glob("*.json")] == ["badencoder"]
