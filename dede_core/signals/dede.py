"""DeDe's normalised score: the image's own embedding explains it worse than other images' embeddings do.

Shown beside the verdict, not combined into it: on clean corpora its distribution has tails a normal fitted to
the bulk does not explain (sub-populations the decoder draws badly: 0.7% and 8% of clean images flagged on the
SIG cases), and where triggered images do stand out in it they also collapse (docs/results/verdict.md).
"""

from dede_core.signals.registry import Signal, register

DEDE = register(Signal(
    name="dede", table="scores", column="score", tail="upper", scale="log", in_verdict=False,
    about="the decoder cannot reconstruct the image from its own embedding as well as from other images'"))
