"""The encoders people fine-tune on: `timm:NAME?weights=PATH` and `hf:PATH`, each a tiny random model saved
locally (nothing is downloaded: HF_HUB_OFFLINE is set)."""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from dede_core.detector.encoders import load_encoder, parse_spec
from test_encoders import check_encoder, check_round_trip

TIMM = "vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _timm_weights(path, seed: int, **kwargs) -> str:
    torch.manual_seed(seed)
    model = timm.create_model(TIMM, pretrained=False, img_size=32, **kwargs)  # with its classifier head
    save_file(model.state_dict(), str(path))
    return str(path)


# --- timm ----------------------------------------------------------------------------------------------

def test_timm_vit_loads_local_weights_and_embeds_its_pooled_feature(tmp_path):
    weights = _timm_weights(tmp_path / "vit.safetensors", seed=0)
    encoder = load_encoder(f"timm:{TIMM}?size=32&weights={weights}")
    out = check_encoder(encoder, 192)  # vit_tiny's width: the pooled feature, classifier removed
    check_round_trip(encoder)
    assert encoder.input_size == 32 and encoder.mean == (0.5, 0.5, 0.5)  # the model's own cfg norm
    assert torch.equal(out, load_encoder(encoder.spec)(torch.rand(3, 3, 20, 24,
                                                                 generator=torch.Generator().manual_seed(0))))
    other = load_encoder(f"timm:{TIMM}?size=32&weights={_timm_weights(tmp_path / 'b.safetensors', seed=1)}")
    assert other.fingerprint != encoder.fingerprint


def test_timm_torch_file_and_cfg_defaults(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "r.pt")  # a torch file, read with weights_only=True
    encoder = load_encoder(f"timm:resnet10t?weights={tmp_path / 'r.pt'}")
    assert encoder.input_size == model.pretrained_cfg["input_size"][-1]  # size from the model's cfg
    assert encoder.mean == pytest.approx(model.pretrained_cfg["mean"])
    check_encoder(encoder, model.num_features)
    # an explicit size or norm wins over the cfg; a convnet takes any size
    assert load_encoder("timm:resnet10t?size=48&norm=clip").input_size == 48


def test_timm_refuses_unknown_models_and_mismatched_weights(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model"):
        load_encoder("timm:not_a_model")
    wrong = _timm_weights(tmp_path / "vit.safetensors", seed=0)  # built for 32 px: position embeddings differ
    with pytest.raises(ValueError, match="do not fit"):
        load_encoder(f"timm:{TIMM}?weights={wrong}")
    assert str(parse_spec(f"timm:{TIMM}?norm=imagenet")) == f"timm:{TIMM}?norm=imagenet"  # no default preset


# --- Hugging Face transformers ---------------------------------------------------------------------------

try:
    import transformers
except ImportError:  # the hf extra is optional: its tests skip, the timm ones above still run
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="the hf extra (transformers) is not installed")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)


def _save(folder, kind: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    if kind == "clip":
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(projection_dim=16, **TINY))
    elif kind == "clip-tower":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))
    elif kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY))
    model.save_pretrained(folder)
    return str(folder)


@needs_hf
@pytest.mark.parametrize(("kind", "dim", "mean"), [("clip", 16, 0.48145466), ("clip-tower", 32, 0.48145466),
                                                   ("dinov2", 32, 0.485), ("siglip", 32, 0.5)])
def test_hf_vision_models_embed_from_a_local_folder(tmp_path, kind, dim, mean):
    """image_embeds with a projection (16), else pooler_output (32); size from the config, the family's norm."""
    encoder = load_encoder(f"hf:{_save(tmp_path / 'a', kind)}")
    check_encoder(encoder, dim)
    check_round_trip(encoder)
    assert encoder.input_size == 32 and encoder.mean[0] == pytest.approx(mean)
    assert load_encoder(f"hf:{_save(tmp_path / 'b', kind, seed=1)}").fingerprint != encoder.fingerprint


@needs_hf
def test_hf_preprocessor_config_sets_size_and_norm(tmp_path):
    folder = _save(tmp_path / "dino", "dinov2")
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps(
        {"do_center_crop": True, "crop_size": {"height": 48, "width": 48}, "size": {"shortest_edge": 56},
         "do_normalize": True, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    encoder = load_encoder(f"hf:{folder}")
    assert encoder.input_size == 48 and encoder.mean == (0.1, 0.2, 0.3) and encoder.std == (0.4, 0.5, 0.6)
    check_encoder(encoder, 32)  # DINOv2 interpolates its position embeddings to 48 px
    assert load_encoder(f"hf:{folder}?size=32&norm=imagenet").mean == (0.485, 0.456, 0.406)


@needs_hf
def test_hf_clip_at_another_size_interpolates(tmp_path):
    encoder = load_encoder(f"hf:{_save(tmp_path / 'clip', 'clip')}?size=48")
    assert encoder.input_size == 48
    check_encoder(encoder, 16)


@needs_hf
def test_hf_refuses_a_hub_name_and_non_vision_folders(tmp_path):
    with pytest.raises(ValueError, match="no config.json.*not downloaded"):
        load_encoder("hf:openai/clip-vit-base-patch32")
    text = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                          intermediate_size=64))
    text.save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a vision model"):
        load_encoder(f"hf:{tmp_path / 'bert'}")


def test_hf_without_transformers_says_which_extra_to_install(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the hf extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'dede\[hf\]'"):
        load_encoder(f"hf:{tmp_path}")
