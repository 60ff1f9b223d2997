"""Victim recipes: a packaged pretrained encoder (EfficientNet-Lite0) backdoored and loaded back by its spec."""

import dataclasses
from pathlib import Path

import pytest
import torch

from bench.attacks.badencoder import BackdoorConfig
from dede_core.detector.encoders import load_encoder
from bench.victims import VictimRecipe, build_victim, evaluate_victim

pytestmark = pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                                reason="needs Debian's dataset-fashion-mnist")

TINY = BackdoorConfig(trigger="patch", target=0, references=2, shadow_images=32, epochs=1, batch_size=16, lr=1e-4)


def test_spec_names_the_backdoored_weights_for_either_base(tmp_path):
    weights = tmp_path / "bad.pt"
    assert VictimRecipe().spec(weights) == f"cifar-resnet18?weights={weights}&width=16"
    assert VictimRecipe(pretrained="efficientnet-lite0?size=32").spec(weights) == \
        f"efficientnet-lite0?size=32&weights={weights}"
    assert VictimRecipe(pretrained="efficientnet-lite0").spec(weights) == f"efficientnet-lite0?weights={weights}"


def test_pretrained_encoder_is_backdoored_cached_and_loaded_by_spec(tmp_path):
    recipe = VictimRecipe(backdoor=TINY, pretrained="efficientnet-lite0?size=32")
    clean, bad = build_victim(recipe, tmp_path, log=lambda text: None)
    assert clean is None and bad.is_file()
    packaged, backdoored = load_encoder("efficientnet-lite0?size=32"), load_encoder(recipe.spec(bad))
    assert backdoored.dim == packaged.dim == 1280
    assert backdoored.fingerprint != packaged.fingerprint  # the fine-tune changed the weights
    mtime = bad.stat().st_mtime_ns
    assert build_victim(recipe, tmp_path, log=lambda text: None)[1] == bad and bad.stat().st_mtime_ns == mtime
    # Another backdoor setting is another cache entry.
    other = dataclasses.replace(recipe, backdoor=dataclasses.replace(TINY, seed=1))
    assert build_victim(other, tmp_path, log=lambda text: None)[1] != bad
    metrics = evaluate_victim(recipe.spec(bad), trigger="patch", target=0, train_images=64, test_images=64)
    assert set(metrics) == {"knn_accuracy", "clean_accuracy", "attack_success_rate"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_efficientnet_weights_option_refuses_a_foreign_state_dict(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="missing"):
        load_encoder(f"efficientnet-lite0?size=32&weights={path}")
