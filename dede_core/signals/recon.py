"""DeDe's raw reconstruction error, before the normalisation by the reference embeddings."""

from dede_core.signals.registry import Signal, register

RECON = register(Signal(
    name="recon", table="scores", column="recon_error", tail="upper", scale="log", in_verdict=False,
    about="the decoder's raw reconstruction error is high"))
