"""Detector configuration: one frozen dataclass, and the named presets.

The config travels with every checkpoint and every scores file, so each field says what it means.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dede_core.io.images import View


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that shapes the DeDe detector, its training and its score."""

    # Images as the detector sees them: square side, channels, patch side.
    img_size: int = 32
    in_chans: int = 3
    patch_size: int = 4
    # How a decoded image is brought to img_size: "resize" (shorter side, centre crop) or "pad" (zero border
    # for smaller images, e.g. 28x28 Fashion-MNIST -> 32x32).
    fit: str = "resize"
    # Pixel normalisation for reconstruction targets: x01 -> (x01 - mean) / std, per channel.
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # Patch encoder (MAE-style ViT over the visible patches).
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    # Decoder (MAE-style, mask tokens for hidden patches).
    decoder_embed_dim: int = 192
    decoder_depth: int = 4
    decoder_num_heads: int = 3
    mlp_ratio: float = 4.0
    # Inject the victim's global embedding as token 0. False gives the ablation: a plain masked autoencoder.
    use_global: bool = True
    # Visible patches per sample while training (reference: int(64 * (1 - 0.9)) = 6 at 32x32, p=4).
    train_visible: int = 6
    # Visible patches per sample while scoring (reference: int(64 * (1 - 0.99)) = 0, the embedding alone).
    score_visible: int = 0

    def __post_init__(self) -> None:
        if self.img_size <= 0 or self.patch_size <= 0 or self.img_size % self.patch_size:
            raise ValueError(
                f"img_size ({self.img_size}) must be a positive multiple of patch_size ({self.patch_size})"
            )
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if self.fit not in ("resize", "pad"):
            raise ValueError(f"fit must be 'resize' or 'pad', got {self.fit!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans or min(self.std) <= 0:
            raise ValueError(f"mean and std need {self.in_chans} values each, std > 0; got {self.mean}, {self.std}")
        for dim, heads, name in (
            (self.embed_dim, self.num_heads, "embed_dim"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim"),
        ):
            if heads <= 0 or dim % heads:
                raise ValueError(f"{name} ({dim}) must be divisible by its number of heads ({heads})")
        for name in ("train_visible", "score_visible"):
            value = getattr(self, name)
            if not 0 <= value < self.num_patches:
                raise ValueError(
                    f"{name} must be in [0, {self.num_patches - 1}] (at least one hidden patch), got {value}"
                )

    @property
    def view(self) -> View:
        """How the detector sees an image (its reconstruction target)."""
        return View(self.img_size, self.in_chans, self.fit)

    @property
    def num_patches(self) -> int:
        """Patches per image, L."""
        return (self.img_size // self.patch_size) ** 2

    def replace(self, **changes: Any) -> DetectorConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        """Inverse of to_dict; unknown fields are an error, not silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown detector config fields: {sorted(unknown)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)


def visible_for_mask_ratio(num_patches: int, mask_ratio: float) -> int:
    """The reference's rounding: int(L * (1 - mask_ratio)) patches stay visible."""
    return int(num_patches * (1 - mask_ratio))


def paper(**overrides: Any) -> DetectorConfig:
    """The reference settings: width 192, 12 encoder / 4 decoder blocks, 3 heads, patch 4 at 32x32,
    train mask ratio 0.9 (6 visible patches), scoring from the embedding alone (0 visible patches)."""
    return DetectorConfig(**overrides)


def cpu(**overrides: Any) -> DetectorConfig:
    """A small detector for 2 CPU cores: width 128, 4 encoder / 2 decoder blocks, 4 heads, otherwise as paper.

    1.24 M parameters (plus D x 128 for the embedding projection) against the paper preset's 7.20 M (plus
    D x 192); README gives its measured training and scoring speed on 2 CPU cores.
    """
    settings: dict[str, Any] = dict(
        embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4
    )
    settings.update(overrides)
    return DetectorConfig(**settings)


PRESETS = {"paper": paper, "cpu": cpu}

# Detector sides chosen from the data: each keeps the reference's 8 x 8 patch grid (32 px with patch 4), so the
# transformer's cost stays the same while small triggers keep their pixels. 128 caps the reconstruction cost.
DATA_SIDES = (32, 64, 96, 128)
GRID = 8


def size_for_side(side: int) -> dict[str, int]:
    """{img_size, patch_size} for images whose typical (median shorter) side is `side` pixels: the nearest of
    DATA_SIDES (ties to the smaller), with an 8 x 8 patch grid."""
    if side <= 0:
        raise ValueError(f"image side must be positive, got {side}")
    img_size = min(DATA_SIDES, key=lambda s: (abs(s - side), s))
    return {"img_size": img_size, "patch_size": img_size // GRID}


def preset(name: str, **overrides: Any) -> DetectorConfig:
    """Look up a preset factory by name (the CLI's --preset)."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return factory(**overrides)
