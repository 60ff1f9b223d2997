"""Distance to the auxiliary images: an embedding collapsed onto a backdoor target sits far from every clean one."""

from dede_core.signals.registry import Signal, register

AUX_DISTANCE = register(Signal(
    name="aux_distance", table="scores", column="knn_score", tail="upper", scale="log", in_verdict=True,
    about="the embedding is far from every auxiliary image's (the k-th nearest of the detector's bank)"))
