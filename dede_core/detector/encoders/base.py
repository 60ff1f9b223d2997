"""FrozenEncoder: the victim encoder f, frozen, behind one small interface `(N, C, H, W) -> (N, D)`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dede_core.detector.hashing import tensor_digest
from dede_core.io.images import View

from .spec import parse_spec

# ITU-R BT.601 luma weights, the ones PIL's convert("L") uses, so a grayscale model sees what it was fed.
_LUMA = (0.299, 0.587, 0.114)


def state_fingerprint(model: nn.Module) -> str:
    """sha256 hex over the state_dict: sorted names, each with dtype, shape and raw bytes."""
    return tensor_digest(model.state_dict())


def adapt_channels(images: Tensor, in_chans: int) -> Tensor:
    """(N, C, H, W) with C in {1, 3} -> (N, in_chans, H, W): gray is repeated, colour goes to luma."""
    chans = images.shape[1]
    if chans == in_chans:
        return images
    if chans == 1 and in_chans == 3:
        return images.expand(-1, 3, -1, -1)
    if chans == 3 and in_chans == 1:
        luma = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * luma).sum(dim=1, keepdim=True)
    raise ValueError(f"images have {chans} channels; expected 1 or 3 (encoder takes {in_chans})")


class FrozenEncoder(nn.Module):
    """A frozen model in eval mode that maps images in [0, 1] to its raw embedding (no norm, no head).

    Build it with `load_encoder(spec)`; constructing it directly is for models already in memory.
    """

    def __init__(self, *, model: nn.Module, spec: str, input_size: int, in_chans: int,
                 mean: Sequence[float], std: Sequence[float], fit: str = "resize",
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        parsed = parse_spec(spec)
        self.spec = str(parsed)  # canonical; load_encoder(self.spec) rebuilds this encoder
        self.kind = parsed.kind
        if input_size <= 0 or in_chans not in (1, 3):
            raise ValueError(f"input_size must be positive and in_chans 1 or 3, got {input_size}, {in_chans}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean and std need {in_chans} values each, got {mean} and {std}")
        self.input_size = int(input_size)
        self.in_chans = int(in_chans)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        # What the model is fed: decoded from the original bytes at its own input size (never through the
        # detector's reconstruction size), as in deployment.
        self.view = View(self.input_size, self.in_chans, fit)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.fingerprint = state_fingerprint(model)
        self.model = model
        # Non-persistent: they follow .to(device) but stay out of the state_dict (and so the fingerprint).
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)
        self.to(device)
        self.train(False)
        self.dim = self._probe_dim()

    def _probe_dim(self) -> int:
        """Embedding width D, from a dummy forward; ValueError if the model does not give (N, ...) tensors."""
        dummy = torch.zeros(2, self.in_chans, self.input_size, self.input_size, device=self._mean.device)
        try:
            out = self._embed(dummy)
        except ValueError:
            raise
        except Exception as err:  # any failure of user-supplied model code on the probe
            raise ValueError(f"encoder {self.spec!r} failed on a dummy input of shape {tuple(dummy.shape)}: "
                             f"{err!r}. Check its size= and chans= options.") from err
        return int(out.shape[1])

    def train(self, mode: bool = True) -> FrozenEncoder:
        """Stays in eval mode whatever `mode` says: the victim's BatchNorm statistics must never move."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """(N, C, H, W) float in [0, 1], any H/W, C in {1, 3} -> (N, D) float32 raw embedding."""
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got {images.dtype} (divide uint8 by 255)")
        return self._embed(images)

    def prepare(self, images: Tensor) -> Tensor:
        """What the model sees: channels adapted, resized to input_size, normalised. Differentiable, so a
        fine-tune of a copy of `model` (bench.victims) feeds its inputs exactly as this encoder does."""
        x = adapt_channels(images.to(self._mean.device, torch.float32), self.in_chans)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - self._mean) / self._std

    def _embed(self, images: Tensor) -> Tensor:
        # no_grad rather than inference_mode: the output later feeds a trainable layer, and inference tensors
        # cannot take part in autograd.
        with torch.no_grad():
            x = self.prepare(images)
            out = self.model(x.to(self._model_dtype()))
            if not isinstance(out, Tensor) or out.ndim < 2 or out.shape[0] != x.shape[0]:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"encoder {self.spec!r} returned {shape} for a batch of {x.shape[0]}; "
                                 f"it must return one (N, ...) tensor")
            return out.flatten(1).float()

    def _model_dtype(self) -> torch.dtype:
        for param in self.model.parameters():
            if param.is_floating_point():
                return param.dtype
        return torch.float32

    def extra_repr(self) -> str:
        return (f"spec={self.spec!r}, dim={getattr(self, 'dim', '?')}, input_size={self.input_size}, "
                f"in_chans={self.in_chans}, fingerprint={self.fingerprint[:12]}")
