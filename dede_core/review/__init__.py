"""`dede review RUN`: a local web app over a finished run (app), the reviewer's decisions (store), what the page
shows (queries, projection). `dede clean --decisions` applies the decisions (dede_core.stages.decisions)."""

from dede_core.review.app import create_app, server
from dede_core.review.store import DecisionStore

__all__ = ["create_app", "server", "DecisionStore"]
