"""Collapse: embedding neighbours that are tight in the victim's embedding yet unlike in pixels.

A backdoor maps different pictures onto one target, so triggered samples are each other's nearest neighbours
although they share nothing but the trigger. The neighbours stage's `collapse` column is the mean thumbnail
difference to the 5 nearest neighbours per unit of their embedding distance: clean groups that are tight in the
embedding (one picture re-encoded or resized, views of one scene) are alike in pixels too and stay ordinary.

Its weight in the verdict is twice `aux_distance`'s: it reads no auxiliary image, so it means the same whether
the auxiliary set is clean, carries triggers or is out of distribution, where `aux_distance` goes blind when the
auxiliary set carries the trigger (docs/results/verdict.md).
"""

from dede_core.signals.registry import Signal, register

COLLAPSE = register(Signal(
    name="collapse", table="neighbours", column="collapse", tail="upper", scale="log", in_verdict=True,
    about="the embedding's nearest neighbours in the corpus are far closer than their pixels are alike", weight=2.0))
