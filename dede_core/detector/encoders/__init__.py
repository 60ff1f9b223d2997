"""Victim encoders: load a frozen self-supervised model from a spec string (docs/encoders.md)."""

from .base import FrozenEncoder
from .builders import load_encoder
from .cifar_resnet import cifar_resnet18
from .spec import EncoderSpec, parse_spec

__all__ = ["EncoderSpec", "FrozenEncoder", "cifar_resnet18", "load_encoder", "parse_spec"]
