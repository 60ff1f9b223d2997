import pytest

from dede_core.detector.config import DetectorConfig, cpu, paper, preset, visible_for_mask_ratio


def test_paper_preset_matches_the_reference():
    cfg = paper()
    assert (cfg.embed_dim, cfg.depth, cfg.decoder_depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (
        192, 12, 4, 3, 4, 32)
    assert cfg.num_patches == 64
    assert cfg.train_visible == visible_for_mask_ratio(64, 0.9) == 6
    assert cfg.score_visible == visible_for_mask_ratio(64, 0.99) == 0


def test_cpu_preset_is_smaller():
    assert cpu().embed_dim < paper().embed_dim and cpu().depth < paper().depth


def test_round_trip_through_dict():
    cfg = cpu(in_chans=1, mean=(0.5,), std=(0.5,), fit="pad")
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad", [
    dict(img_size=30), dict(in_chans=2), dict(fit="stretch"), dict(mean=(0.5,)),
    dict(embed_dim=100, num_heads=3), dict(train_visible=64), dict(score_visible=-1),
])
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValueError):
        paper(**bad)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown detector config fields"):
        DetectorConfig.from_dict({"bogus": 1})
