"""DeDe's normalised score: the image's own embedding explains it worse than other images' embeddings do."""

from dede_core.signals.registry import Signal, register

DEDE = register(Signal(
    name="dede", table="scores", column="score", tail="upper", scale="log", in_verdict=True,
    about="the decoder cannot reconstruct the image from its own embedding as well as from other images'"))
