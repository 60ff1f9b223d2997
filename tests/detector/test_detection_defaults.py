"""Detection defaults: each model sees its own view of one decode, the detector's size comes from the data,
training stops on the held-out embedding reliance, and a detector that ignores the embedding fails its health check
(and clean refuses it)."""

import io
import json

import pytest
import torch
from PIL import Image

from conftest import on_dede_log, smooth_images
from bench.attacks import apply_trigger
from dede_core.detector.checkpoint import load_checkpoint
from dede_core.detector.config import cpu, size_for_side
from dede_core.detector.health import RELIANCE_FLOOR, describe_health, health_check
from dede_core.io.images import View, decode_image, decode_views, fit_tensor
from dede_core.detector.model import DeDe
from dede_core.detector.scorer import ScoreConfig, Scorer
from dede_core.stages.select import Rule, check_health
from dede_core.io.sources import open_source
from dede_core.detector.aux import detector_config
from dede_core.detector.train import TrainConfig, best_epoch, stop_reason, train_detector

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder64(tmp_path_factory):
    """24 PNGs of 64 x 64 px."""
    root = tmp_path_factory.mktemp("images64") / "a"
    root.mkdir()
    for i, image in enumerate(smooth_images(24, size=64, seed=4)):
        (root / f"img_{i:03d}.png").write_bytes(_png(image))
    return root.parent


def test_one_decode_gives_each_model_its_own_view():
    image = smooth_images(1, size=64, seed=1)[0]
    big, small = decode_views(_png(image), (View(64, 3), View(32, 1, "resize")))
    assert torch.equal(big, image)  # the encoder's view at the image's own size is the image itself
    assert torch.equal(small, decode_image(_png(image), size=32, channels=1))
    assert torch.equal(fit_tensor(image[None], View(32, 1))[0], small)  # in-memory images take the same path


def test_detector_size_follows_the_data(folder64, image_folder):
    assert size_for_side(28) == {"img_size": 32, "patch_size": 4}
    assert size_for_side(224) == {"img_size": 128, "patch_size": 16}
    config, note = detector_config("cpu", {}, open_source(str(folder64)))
    assert (config.img_size, config.patch_size, config.num_patches) == (64, 8, 64) and "median side" in note
    config, _ = detector_config("cpu", {}, open_source(str(image_folder)))
    assert (config.img_size, config.patch_size) == (32, 4)
    config, note = detector_config("cpu", {"img_size": 48, "patch_size": 6}, open_source(str(folder64)))
    assert (config.img_size, config.patch_size) == (48, 6) and "given" in note


def test_stop_rule_waits_for_the_reliance_to_stop_improving():
    train = TrainConfig(patience=3, max_epochs=50, min_steps=7)
    history = [1.0, 1.0, 1.2, 1.5, 1.505, 1.506, 1.4]
    assert best_epoch(history, train) == 4  # 1.505 and 1.506 are below a 0.5% gain over 1.5
    assert stop_reason(history[:6], 6, train) is None
    assert stop_reason(history, 7, TrainConfig(patience=3, min_steps=100), steps_per_epoch=10) is None  # 70 steps
    assert "best 1.500 at epoch 4" in stop_reason(history, 7, train)
    assert stop_reason([1.0] * 3, 3, TrainConfig(epochs=3)) == "3 epochs as asked"
    assert stop_reason([1.0, 2.0], 2, TrainConfig(max_epochs=2)) == "max_epochs 2"


def test_scorer_feeds_the_encoder_its_own_size(folder64, encoder_spec):
    from dede_core.detector.encoders import load_encoder

    encoder = load_encoder(encoder_spec + "&size=64")
    model = DeDe(config=cpu(**TINY), global_dim=encoder.dim).eval()
    refs = torch.randn(4, encoder.dim, generator=torch.Generator().manual_seed(0))
    scorer = Scorer(detector=model, encoder=encoder, config=ScoreConfig(chunk=8), references=refs)
    source = open_source(str(folder64))
    views = [decode_views(source[i].data, (model.config.view, encoder.view)) for i in range(8)]
    small, big = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
    keys = source.keys()[:8]
    with pytest.raises(ValueError, match="pass the encoder's own view"):
        scorer.score(small, keys)
    out = scorer.score(small, keys, victim=big)
    assert torch.equal(out.embedding, scorer.embed(big))
    assert not torch.equal(out.embedding, scorer.embed(small))  # a 32-px thumbnail is not what the victim sees
    assert torch.equal(scorer.score(small, keys, embedding=out.embedding).score, out.score)
    assert torch.all(out.score > 0) and torch.all(out.error > 0)


def _detector(tmp_path, folder, encoder, **config):
    path = train_detector(source=open_source(str(folder)), data_id="t", encoder=encoder, config=cpu(**TINY, **config),
                          train=TrainConfig(epochs=None, max_epochs=3, patience=2, batch_size=8, holdout=8),
                          out_dir=tmp_path)
    return load_checkpoint(path)


def test_training_until_convergence_records_health_and_resumes_exactly(tmp_path, image_folder, encoder):
    straight = _detector(tmp_path / "a", image_folder, encoder)
    meta = straight.meta
    assert meta["complete"] and meta["stopped"] and len(meta["reliance_history"]) == meta["epoch"] <= 3
    assert set(meta["health"]) >= {"embedding_reliance", "own_better", "floor", "passed"}
    assert straight.calibration_embeddings.shape == (8, encoder.dim)

    def stop_after_epoch_1(line):
        if line.startswith("epoch 1 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), on_dede_log(stop_after_epoch_1):
        train_detector(source=open_source(str(image_folder)), data_id="t", encoder=encoder, config=cpu(**TINY),
                       train=TrainConfig(epochs=None, max_epochs=3, patience=2, batch_size=8, holdout=8),
                       out_dir=tmp_path / "b")
    resumed = _detector(tmp_path / "b", image_folder, encoder)
    assert resumed.content_hash == straight.content_hash and resumed.meta["health"] == meta["health"]


def test_health_check_fails_the_no_embedding_ablation(tmp_path, image_folder, encoder):
    ablation = _detector(tmp_path, image_folder, encoder, use_global=False)
    health = ablation.meta["health"]
    assert health["embedding_reliance"] == 1.0 and health["passed"] is False
    assert "CANNOT FIND BACKDOORS" in describe_health(health) and "--allow-weak-detector" in describe_health(health)


def test_health_check_passes_a_detector_that_uses_the_embedding():
    """A decoder that draws each image from its embedding alone (here: the embedding is the image's own mean
    colour and the decoder is trained only on that) reconstructs better from the own embedding than another's."""
    torch.manual_seed(0)
    colours = torch.rand(32, 3)
    images = (colours[:, :, None, None].expand(-1, -1, 32, 32) * 255).round().to(torch.uint8)
    model = DeDe(config=cpu(**TINY), global_dim=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        x = model.normalize(images.float() / 255)
        loss, _, _ = model(x, colours, torch.rand(32, model.config.num_patches), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    calibration = {"images": images, "embeddings": colours, "keys": [f"k{i}" for i in range(32)]}
    health = health_check(model, calibration, torch.device("cpu"))
    assert health["embedding_reliance"] >= RELIANCE_FLOOR and health["passed"] and health["own_better"] > 0.9


def test_clean_refuses_a_weak_detector_unless_allowed(tmp_path):
    scores = tmp_path / "scores"
    scores.mkdir()
    weak = {"embedding_reliance": 1.0, "own_better": 0.5, "floor": RELIANCE_FLOOR, "passed": False, "images": 8}
    (scores / "run.json").write_text(json.dumps({"detector_health": weak}))
    with pytest.raises(ValueError, match="CANNOT FIND BACKDOORS"):
        check_health(str(scores), Rule.fpr(0.05))
    import dataclasses

    allowed = dataclasses.replace(Rule.fpr(0.05), allow_weak_detector=True)
    assert check_health(str(scores), allowed) == weak
    assert Rule.from_dict(allowed.to_dict()) == allowed


def test_sticker_trigger_is_a_real_photo_at_a_seeded_random_place():
    images = torch.full((6, 3, 64, 64), 128, dtype=torch.uint8)
    a, b = apply_trigger("sticker", images, seed=1), apply_trigger("sticker", images, seed=2)
    assert torch.equal(a, apply_trigger("sticker", images, seed=1)) and not torch.equal(a, b)
    changed = (a != images).any(dim=1)
    corners = {tuple(torch.nonzero(m)[0].tolist()) for m in changed}
    assert len(corners) > 1  # not one fixed position
    assert all(13 - 2 <= int(m.any(dim=0).sum()) <= 13 for m in changed)  # 0.2 x 64 px, minus grey pixels
