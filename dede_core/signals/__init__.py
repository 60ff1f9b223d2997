"""Detection signals (one module each), their p-values and the combined verdict."""

from dede_core.signals import (aux_distance, collapse, dede, outlier, recon,  # noqa: F401 - one signal each
                               tightness)
from dede_core.signals.registry import SIGNALS, Signal, register, signals

__all__ = ["SIGNALS", "Signal", "register", "signals"]
