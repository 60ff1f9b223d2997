"""A tiny finished run for the review app (a fixture the review tests import; not a conftest, whose module name
would shadow tests/conftest.py for `from conftest import ...` elsewhere): shards, scores (with embeddings),
neighbourhoods and a clean folder, built by hand without a model (the builders of tests/stages/test_select.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "stages"))

from test_select import png, row, write_scores, write_shards  # noqa: E402

from dede_core.stages.clean import clean  # noqa: E402
from dede_core.stages.select import Rule  # noqa: E402

N = 24
KEYS = [f"k{i:02d}" for i in range(N)]
RULE = Rule.threshold(1850.0)  # drops k18..k23
FLAGGED = set(KEYS[18:])
GROUPS = {"n1": ["k18", "k19", "k02", "k03"], "n2": ["k20", "k05"]}  # neighbourhoods holding a flagged sample


def build_run(root: str) -> str:
    """RUN/{shards,scores,neighbours,clean} of 24 samples over two shards; returns RUN."""
    run = os.path.join(root, "run")
    shards = [[{"__key__": k, "png": png(i, size=32), "cls": str(i % 3).encode()} for i, k in enumerate(KEYS)
               if i // 12 == s] for s in (0, 1)]
    write_shards(os.path.join(run, "shards"), shards)
    rows = [row(k, f"{i // 12:06d}.tar", i % 12, 100.0 * (i + 1), 1.0 + i / 10) | {"label": i % 3}
            for i, k in enumerate(KEYS)]
    write_scores(os.path.join(run, "scores"), rows, [(float(v), 1.0) for v in range(100, 700)])
    emb = os.path.join(run, "scores", "embeddings")
    os.makedirs(emb)
    vectors = np.random.default_rng(0).normal(size=(N, 8)).astype(np.float16)
    for s in (0, 1):
        part = vectors[s * 12:(s + 1) * 12]
        column = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1), pa.float16()), 8)
        pq.write_table(pa.table({"key": KEYS[s * 12:(s + 1) * 12], "embedding": column}),
                       os.path.join(emb, f"{s:06d}.parquet"))
    group_of = {k: g for g, ks in GROUPS.items() for k in ks}
    os.makedirs(os.path.join(run, "neighbours"))
    pq.write_table(pa.table({
        "key": KEYS, "shard": [f"{i // 12:06d}.tar" for i in range(N)], "position": [i % 12 for i in range(N)],
        "group_id": [int(group_of[k][1:]) if k in group_of else 100 + i for i, k in enumerate(KEYS)],
        "group_size": [len(GROUPS[group_of[k]]) if k in group_of else 1 for k in KEYS]}),
        os.path.join(run, "neighbours", "000000.parquet"))
    with open(os.path.join(run, "neighbours", "summary.json"), "w") as f:  # written last: the folder is finished
        f.write("{}")
    clean(os.path.join(run, "shards"), os.path.join(run, "scores"), os.path.join(run, "clean"), RULE,
          progress=False)
    return run


@pytest.fixture
def review_run(tmp_path) -> str:
    return build_run(str(tmp_path))
