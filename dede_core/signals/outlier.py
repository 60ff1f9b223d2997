"""Local outlierness in the corpus (DAO: dimensionality-aware outlier score, the family the ICLR 2025 study of
CLIP backdoor samples found best): a sample whose neighbourhood is sparser than its neighbours' are."""

from dede_core.signals.registry import Signal, register

OUTLIER = register(Signal(
    name="outlier", table="neighbours", column="dao", tail="upper", scale="log", in_verdict=False,
    about="the sample's corpus neighbourhood is sparser than its neighbours' (DAO local outlier score)"))
