"""Backdoor attacks used to evaluate the detector; triggers act on uint8 pixels before normalisation."""

from bench.attacks.triggers import (
    TRIGGERS,
    TriggerFn,
    apply_trigger,
    blend_trigger,
    ctrl_positions,
    ctrl_trigger,
    patch_trigger,
    sticker_trigger,
    trigger_mask,
    wanet_trigger,
)

__all__ = [
    "TRIGGERS",
    "TriggerFn",
    "apply_trigger",
    "blend_trigger",
    "ctrl_positions",
    "ctrl_trigger",
    "patch_trigger",
    "sticker_trigger",
    "trigger_mask",
    "wanet_trigger",
]
