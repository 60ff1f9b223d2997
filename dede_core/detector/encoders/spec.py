"""Encoder spec strings: `KIND[:TARGET][?key=value&key=value]`, parsed into a frozen `EncoderSpec`.

The canonical form (``str(spec)``) sorts the options, normalises their values and drops options equal to the
kind's default, so two spellings of the same encoder give the same string.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

SYNTAX = "KIND[:TARGET][?key=value&key=value]"

Norm = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std), one value per input channel

# (mean, std) per channel; "none" means identity (mean 0, std 1) at whatever channel count.
NORMS: dict[str, Norm | None] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # TF-ported models: maps [0, 1] to [-1, 1]
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # open_clip.OPENAI_DATASET_MEAN / _STD, copied so parsing does not import open_clip.
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": None,
}

_REQUIRED = object()  # marks an option the user must give


@dataclass(frozen=True)
class _Kind:
    target: str | None  # what TARGET names, for messages; None: the kind takes no target
    defaults: dict[str, Any]  # allowed options -> default (None: unset unless given; _REQUIRED: must be given)
    example: str


# Explicit normalisation instead of a norm preset, and how an image reaches the input size ("resize": shorter
# side to size, then centre crop, as deployment pipelines feed a model; "pad": zero border around smaller images).
_NORM_OPTS = {"mean": None, "std": None, "fit": "resize"}
KINDS: dict[str, _Kind] = {
    "torchscript": _Kind("PATH", {"size": _REQUIRED, "chans": 3, "norm": "none", **_NORM_OPTS},
                         "torchscript:encoder.pt?size=32"),
    "torchvision": _Kind("ARCH", {"weights": None, "size": 224, "norm": "imagenet", **_NORM_OPTS},
                         "torchvision:resnet18?weights=resnet18.safetensors"),
    "callable": _Kind("MODULE:FACTORY", {"size": _REQUIRED, "chans": 3, "norm": "none", **_NORM_OPTS},
                      "callable:my_pkg.models:build_encoder?size=32"),
    "cifar-resnet18": _Kind(None, {"width": 64, "weights": None, "size": 32, "chans": 3,
                                   "norm": "cifar10", **_NORM_OPTS}, "cifar-resnet18?weights=simclr.pt"),
    "efficientnet-lite0": _Kind(None, {"size": 224, "weights": None, "norm": "inception", **_NORM_OPTS},
                                "efficientnet-lite0"),
    "open-clip": _Kind("ARCH", {"pretrained": None, "size": None, "norm": "clip", **_NORM_OPTS},
                       "open-clip:RN50?pretrained=RN50.pt"),
    # size and norm None: the model's own (timm's pretrained_cfg, the folder's preprocessor_config.json).
    "timm": _Kind("NAME", {"weights": None, "size": None, "norm": None, **_NORM_OPTS},
                  "timm:vit_small_patch16_224.dino?weights=dino_vits16.safetensors"),
    "hf": _Kind("PATH", {"size": None, "norm": None, **_NORM_OPTS}, "hf:victims/clip-vit-b32-vision"),
}


class SpecError(ValueError):
    """A bad spec; `problem` and `kind` let parse_spec restate it with the text the user wrote."""

    def __init__(self, spec: str, problem: str, kind: str | None = None) -> None:
        if kind in KINDS:
            options = ", ".join(f"{k}=" for k in sorted(KINDS[kind].defaults))
            hint = f"e.g. {KINDS[kind].example}; {kind} options: {options}"
        else:
            hint = "e.g. " + ", ".join(k.example for k in KINDS.values())
        super().__init__(f"bad encoder spec {spec!r}: {problem}. Syntax: {SYNTAX}, {hint} (see docs/encoders.md)")
        self.problem, self.kind = problem, kind


def _escape(text: str) -> str:
    # Only the delimiters need escaping; everything else stays readable in the canonical form.
    return text.replace("%", "%25").replace("?", "%3F").replace("&", "%26")


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(repr(float(v)) for v in value)
    return _escape(str(value))


def _parse_value(name: str, text: str) -> Any:
    """Option text -> typed value; raises ValueError naming what is wrong (without the spec)."""
    if text == "":
        raise ValueError(f"option {name} has an empty value")
    if name in ("size", "width", "chans"):
        try:
            number = int(text)
        except ValueError:
            raise ValueError(f"option {name}={text!r} is not an integer") from None
        if number <= 0:
            raise ValueError(f"option {name}={number} must be positive")
        if name == "chans" and number not in (1, 3):
            raise ValueError(f"option chans={number} must be 1 or 3")
        return number
    if name in ("mean", "std"):
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"option {name}={text!r} is not a comma-separated list of numbers") from None
        if name == "std" and any(v <= 0 for v in values):
            raise ValueError(f"option std={text!r} must be positive")
        return values
    if name == "fit":
        if text not in ("resize", "pad"):
            raise ValueError(f"option fit={text!r} is not one of resize|pad")
        return text
    if name == "norm":
        if text.lower() not in NORMS:
            raise ValueError(f"option norm={text!r} is not one of {'|'.join(NORMS)}")
        return text.lower()
    return text  # paths (weights, pretrained)


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed, validated encoder spec; ``str(spec)`` is its canonical string."""

    kind: str  # one of KINDS
    target: str | None = None  # path, architecture or MODULE:FACTORY, depending on the kind
    options: dict[str, Any] = field(default_factory=dict)  # typed values; defaults are dropped

    def __post_init__(self) -> None:
        text = self._text(self.options)
        if self.kind not in KINDS:
            raise SpecError(text, f"unknown kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        kind = KINDS[self.kind]
        if kind.target and not self.target:
            raise SpecError(text, f"kind {self.kind} needs a target {kind.target}", self.kind)
        if not kind.target and self.target:
            raise SpecError(text, f"kind {self.kind} takes no target (got {self.target!r})", self.kind)
        options: dict[str, Any] = {}
        for name, value in self.options.items():
            if name not in kind.defaults:
                raise SpecError(text, f"unknown option {name!r} for kind {self.kind}", self.kind)
            try:
                typed = _parse_value(name, value if isinstance(value, str) else _format_value(value))
            except ValueError as err:
                raise SpecError(text, str(err), self.kind) from None
            if typed != kind.defaults[name]:
                options[name] = typed
        if "norm" in self.options and ("mean" in self.options or "std" in self.options):
            raise SpecError(text, "give either norm=... or mean=...&std=..., not both", self.kind)
        missing = [n for n, d in kind.defaults.items() if d is _REQUIRED and n not in options]
        if missing:
            raise SpecError(text, f"kind {self.kind} needs option {missing[0]}=...", self.kind)
        object.__setattr__(self, "options", dict(sorted(options.items())))
        try:
            resolve_norm(self)
        except ValueError as err:
            raise SpecError(text, str(err), self.kind) from None

    def _text(self, options: dict[str, Any]) -> str:
        out = self.kind + (f":{_escape(self.target)}" if self.target else "")
        if options:
            out += "?" + "&".join(f"{k}={_format_value(v)}" for k, v in sorted(options.items()))
        return out

    def __str__(self) -> str:
        return self._text(self.options)

    def option(self, name: str, fallback: Any = None) -> Any:
        """The option's value, else the kind's default, else `fallback`."""
        default = KINDS[self.kind].defaults.get(name)
        return self.options.get(name, fallback if default in (None, _REQUIRED) else default)


def parse_spec(spec: str) -> EncoderSpec:
    """Parse `KIND[:TARGET][?key=value&key=value]` into an EncoderSpec; ValueError says what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(str(spec), "empty spec")
    head, _, query = spec.strip().partition("?")
    kind, _, target = head.partition(":")
    options: dict[str, str] = {}
    for item in query.split("&") if query else []:
        name, eq, value = item.partition("=")
        if not eq:
            raise SpecError(spec, f"option {item!r} is not key=value", kind)
        if name in options:
            raise SpecError(spec, f"option {name!r} given twice", kind)
        options[name] = urllib.parse.unquote(value)
    try:
        return EncoderSpec(kind=kind, target=urllib.parse.unquote(target) or None, options=options)
    except SpecError as err:
        raise SpecError(spec, err.problem, err.kind) from None


def resolve_norm(spec: EncoderSpec, natural: Norm | None = None) -> Norm | None:
    """The (mean, std) the encoder's input is normalised with, one value per input channel.

    `natural` is the model's own normalisation, used when the spec names none and its kind has no default
    preset (timm, hf); None then means "not known yet" (while parsing) and is returned as is.
    """
    chans = spec.option("chans", 3)
    mean, std = spec.options.get("mean"), spec.options.get("std")
    if (mean is None) != (std is None):
        raise ValueError("give mean and std together")
    if mean is not None:
        if len(mean) != chans or len(std) != chans:
            raise ValueError(f"mean and std need {chans} values each (chans={chans})")
        return mean, std
    name = spec.option("norm")
    if name is None:
        if natural is not None and (len(natural[0]) != chans or len(natural[1]) != chans):
            raise ValueError(f"the model's own normalisation {natural} does not have {chans} values per channel; "
                             f"give norm=NAME or mean=...&std=...")
        return natural
    preset = NORMS[name]
    if preset is None:
        return (0.0,) * chans, (1.0,) * chans
    if len(preset[0]) != chans:
        raise ValueError(f"norm={name} has {len(preset[0])} channels but chans={chans}; "
                         f"use norm=none or mean=...&std=... with {chans} value(s)")
    return preset
