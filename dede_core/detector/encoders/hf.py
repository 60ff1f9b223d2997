"""Hugging Face `transformers` vision models saved in a local folder (save_pretrained): CLIP's vision tower,
DINOv2, SigLIP's vision model. Loaded with local_files_only=True: nothing is downloaded, no remote code runs."""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

from torch import Tensor, nn

from .spec import Norm

# Normalisation per model_type when the folder has no preprocessor_config.json (what each family trains with).
_FAMILY_NORMS: dict[str, Norm] = {
    "clip_vision_model": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class HFVisionEmbedding(nn.Module):
    """A transformers vision model as `(N, 3, S, S) -> (N, D)`: image_embeds when it has a projection, else
    pooler_output, else the CLS token of last_hidden_state."""

    def __init__(self, *, model: nn.Module, interpolate: bool = False) -> None:
        super().__init__()
        self.model = model
        # Position embeddings interpolated to the input size, when the model takes another size than it was built for.
        self.interpolate = interpolate

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, S, S) normalised pixels -> (N, D) embedding."""
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.model(pixel_values=pixel_values, return_dict=True, **kwargs)
        for name in ("image_embeds", "pooler_output"):
            value = getattr(out, name, None)
            if value is not None:
                return value
        return out.last_hidden_state[:, 0]


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def _side(value: Any, what: str) -> int | None:
    """A side length from a preprocessor size entry: an int, {"height", "width"} or {"shortest_edge"}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise ValueError(f"{what} is non-square ({value}); only square inputs are supported (give size=INT)")
            return int(value["height"])
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
    return None


def preprocessing(folder: str, config: Any) -> tuple[int | None, Norm | None]:
    """(input side, normalisation) the model was trained with: from preprocessor_config.json when the folder has
    one (the centre crop when it crops, else the resize), else the config's image_size and the family's norm."""
    path = os.path.join(folder, "preprocessor_config.json")
    size = getattr(config, "image_size", None)
    norm = _FAMILY_NORMS.get(getattr(config, "model_type", ""))
    if os.path.isfile(path):
        pre = _read_json(path)
        crop = _side(pre.get("crop_size"), f"{path} crop_size") if pre.get("do_center_crop", True) else None
        size = crop or _side(pre.get("size"), f"{path} size") or size
        if not pre.get("do_normalize", True):
            norm = ((0.0,) * 3, (1.0,) * 3)
        elif pre.get("image_mean") is not None and pre.get("image_std") is not None:
            norm = (tuple(float(v) for v in pre["image_mean"]), tuple(float(v) for v in pre["image_std"]))
    if isinstance(size, (list, tuple)):
        if size[0] != size[-1]:
            raise ValueError(f"{folder} holds a model for non-square {tuple(size)} inputs; give size=INT")
        size = size[0]
    return (int(size) if size else None), norm


def load_hf_vision(folder: str, *, size: int | None = None) -> tuple[nn.Module, int | None, Norm | None]:
    """(embedding module, natural input side, natural normalisation) of the vision model saved in `folder`."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError("kind hf needs Hugging Face transformers: pip install 'dede[hf]' "
                          "(or pip install 'transformers>=4.40')") from err
    full = os.path.expanduser(folder)
    if not os.path.isfile(os.path.join(full, "config.json")):
        raise ValueError(f"hf model folder not found: {folder!r} has no config.json. Give a local folder written "
                         f"by save_pretrained (a hub name is not downloaded)")
    config = transformers.AutoConfig.from_pretrained(full, local_files_only=True, trust_remote_code=False)
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{folder}/config.json names no transformers model class (architectures: {arch!r})")
    if getattr(config, "image_size", None) is None:
        raise ValueError(f"{folder} holds a {arch}, not a vision model (its config has no image_size); save the "
                         f"vision tower, e.g. CLIPVisionModelWithProjection or model.vision_model")
    try:
        model, info = cls.from_pretrained(full, local_files_only=True, trust_remote_code=False,
                                          output_loading_info=True)
    except OSError as err:
        raise ValueError(f"cannot load {arch} from {folder}: {err}") from err
    if info.get("missing_keys"):  # transformers would fill them with random values without a word
        missing = sorted(info["missing_keys"])
        raise ValueError(f"weights in {folder} do not fit {arch}: missing ({len(missing)}): "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    natural, norm = preprocessing(full, config)
    accepts = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    interpolate = accepts and (size or natural) != config.image_size
    return HFVisionEmbedding(model=model, interpolate=interpolate), natural, norm
