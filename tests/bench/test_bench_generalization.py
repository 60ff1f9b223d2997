"""The generalization suite's machinery on a tiny configuration (what `dede bench detection --suite generalization
--tiny` runs): a real pretrained victim at its own size, a photo sticker at random places, dede's detector."""

import json

from bench.cases import CASES, photo_crops, tiny_suite
from bench.generalization import run_suite


def test_photo_crops_keep_train_and_test_apart():
    train, labels = photo_crops(32, 24, split="train", seed=0)
    test, _ = photo_crops(32, 24, split="test", seed=0)
    assert train.shape == test.shape == (24, 3, 32, 32) and sorted(set(labels.tolist())) == list(range(12))
    assert not any(bool((a == b).all()) for a in train for b in test)
    assert set(CASES) >= {"sticker64-photos", "blend96-photos", "sticker64-fashion", "sticker64-photos-ood-aux"}


def test_tiny_suite_writes_table_json_and_plots(tmp_path):
    report = run_suite(tiny_suite(), tmp_path / "cache", tmp_path / "out", name="generalization-tiny")
    (result,) = report["results"]
    assert result["encoder"] == "efficientnet-lite0?size=64" and result["works"]
    assert result["detector"]["size"] == 64 and result["detector"]["patch"] == 8
    rows = result["rows"]
    for name in ("dede score (default)", "dede recon_error (raw DeDe)", "knn_score (shipped column)",
                 "density (two-sided, on knn_score)", "dede score + density (rank average)",
                 "no-embedding ablation score (default)"):
        assert 0.0 <= rows[name]["auroc"] <= 1.0, name
    assert result["ablation_health"]["embedding_reliance"] == 1.0 and result["ablation_health"]["passed"] is False
    assert json.loads((tmp_path / "out" / "generalization-tiny.json").read_text())["results"][0]["rows"] == rows
    assert "| sticker64-photos |" in (tmp_path / "out" / "generalization-tiny.md").read_text()
    assert (tmp_path / "out" / "generalization-tiny-roc-sticker64-photos.png").read_bytes()[:4] == b"\x89PNG"
    again = run_suite(tiny_suite(), tmp_path / "cache", tmp_path / "out2", name="generalization-tiny")
    assert again["results"][0]["rows"] == rows  # cached by config hash
