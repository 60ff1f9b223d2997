"""Collapse: the embedding sits abnormally close to other pictures' embeddings in the corpus itself.

Triggered samples are mapped onto one target, so they are each other's nearest neighbours. The distance is to
the 5th nearest neighbour that is not a near-duplicate of the sample (its thumbnail differs): one picture
re-encoded or resized many times is a tight group too, but of copies, and it is not evidence of a backdoor.
"""

from dede_core.signals.registry import Signal, register

COLLAPSE = register(Signal(
    name="collapse", table="neighbours", column="kdist_distinct", tail="lower", scale="log", in_verdict=True,
    about="the embedding sits abnormally close to other, different pictures' embeddings in the corpus"))
