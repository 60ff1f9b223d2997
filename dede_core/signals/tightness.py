"""Tightness: the embedding sits abnormally close to other, different pictures' embeddings in the corpus (the
5th nearest neighbour that is no near-duplicate). Shown beside the verdict: natural groups of one scene are as
tight as a collapsed trigger, which `collapse` tells apart by their pixels (docs/results/verdict.md)."""

from dede_core.signals.registry import Signal, register

TIGHTNESS = register(Signal(
    name="tightness", table="neighbours", column="kdist_distinct", tail="lower", scale="log", in_verdict=False,
    about="the embedding sits abnormally close to other, different pictures' embeddings in the corpus"))
