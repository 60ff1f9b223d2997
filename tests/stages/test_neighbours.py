"""The neighbours stage on a tiny embeddings folder: a planted collapsed cluster stands out, a clean
near-duplicate group does not (kdist_distinct), the runners agree, reruns do nothing, and the IVF index finds
the exact neighbours."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("faiss")

from dede_core.neighbours import index as ix  # noqa: E402
from dede_core.neighbours.corpus import embeddings_table  # noqa: E402
from dede_core.stages.neighbours import (NEIGHBOURS, NeighboursRun, NeighboursSettings,  # noqa: E402
                                         neighbours)
from dede_core.stages.protocol import run_in_order  # noqa: E402
from schemas import names  # noqa: E402

D, PER_SHARD, SHARDS = 32, 100, 3
POISON = np.arange(5, 300, 25)[:12]  # 12 rows spread over the shards
DUPS = np.arange(7, 300, 30)[:10]  # 10 rows
UNSCORED = (150,)  # a sample without an embedding


def corpus_arrays(seed: int = 0, n: int = PER_SHARD * SHARDS):
    rng = np.random.default_rng(seed)
    # Embeddings cluster, each cluster with its own spread (iid noise in 32 dims would put every distance alike)
    centres, spread = rng.normal(size=(15, D)), np.exp(rng.uniform(np.log(0.15), np.log(1.2), 15))
    label = rng.integers(0, 15, n)
    x = centres[label] + spread[label, None] * rng.normal(size=(n, D))
    thumbs = rng.integers(0, 256, size=(n, 256))
    x[POISON] = rng.normal(size=D) + 0.005 * rng.normal(size=(len(POISON), D))  # collapsed: the trigger's point
    x[DUPS] = rng.normal(size=D) + 0.03 * rng.normal(size=(len(DUPS), D))  # one image re-encoded
    base = rng.integers(0, 256, size=256)
    thumbs[DUPS] = np.clip(base + rng.normal(0, 8, size=(len(DUPS), 256)), 0, 255)
    return x, thumbs


def write_scores(root, x, thumbs, *, shards: int = SHARDS, dim_of: dict[int, int] | None = None) -> str:
    """A scores folder as the score stage leaves it: run.json, _done markers, embeddings/<stem>.parquet."""
    scores = root / "scores"
    (scores / names.DONE_DIR).mkdir(parents=True, exist_ok=True)
    (scores / names.EMBEDDINGS_DIR).mkdir(exist_ok=True)
    (scores / names.SCORE_RUN).write_text(json.dumps({"detector_hash": "abc", "shards": f"{shards} shards"}))
    for s in range(shards):
        at = slice(s * PER_SHARD, (s + 1) * PER_SHARD)
        valid = ~np.isin(np.arange(at.start, at.stop), UNSCORED)
        vec = x[at][:, :dim_of[s]] if dim_of and s in dim_of else x[at]
        table = embeddings_table([f"s{s}_{i:04d}" for i in range(PER_SHARD)], vec, thumbs[at], valid)
        pq.write_table(table, scores / names.EMBEDDINGS_DIR / f"{s:06d}.parquet")
        (scores / names.DONE_DIR / f"{s:06d}.json").write_text(json.dumps({"shard": f"{s:06d}.tar", "sha256": str(s)}))
    return str(scores)


def read_out(out) -> "pq.Table":
    return pq.read_table([os.path.join(out, f"{s:06d}.parquet") for s in range(SHARDS)]).to_pandas()


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    x, thumbs = corpus_arrays()
    return write_scores(tmp_path_factory.mktemp("nb"), x, thumbs)


@pytest.fixture(scope="module")
def result(scores, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("nb-out") / "neighbours")
    return out, neighbours(scores, out, progress=False)


def test_planted_cluster_stands_out_and_near_duplicates_do_not(result):
    out, res = result
    df = read_out(out)
    assert res.recomputed and res.summary["index"]["kind"] == "exact"
    assert list(df.columns) == ["key", "shard", "position", "row", "kdist_3", "kdist_5", "kdist_10", "kdist_20",
                                "lid", "slof", "dao", "kdist_distinct", "dup_count", "collapse", "group_id",
                                "group_size"]
    poison, dups = df.loc[POISON], df.loc[DUPS]
    rest = df.drop(index=list(POISON) + list(DUPS) + list(UNSCORED))
    assert set(df.nsmallest(12, "kdist_5").index) == set(POISON)
    assert set(df.nsmallest(12, "kdist_distinct").index) == set(POISON)
    assert dups.kdist_5.max() < rest.kdist_5.min()  # tight in embedding space ...
    assert dups.kdist_distinct.min() > 0.5 * rest.kdist_distinct.median()  # ... but not once duplicates are skipped
    assert (dups.dup_count == 9).all() and (poison.dup_count == 0).all()
    # tight and unlike in pixels: the planted cluster has the highest collapse ratio, the copies an ordinary one
    assert set(df.nlargest(12, "collapse").index) == set(POISON)
    assert poison.collapse.min() > 100 * dups.collapse.max()
    assert (poison.group_size == 12).all() and poison.group_id.nunique() == 1 and poison.group_id.iloc[0] == POISON[0]
    assert (dups.group_size == 10).all() and (rest.group_size == 1).all()
    assert res.summary["group_sizes"] == {"10": 1, "12": 1}
    assert poison.lid.max() < rest.lid.median() or poison.dao.notna().all()
    assert df.loc[UNSCORED[0], ["kdist_5", "lid", "group_id"]].isna().all()
    assert df.shard.iloc[0] == "000000.tar" and df.key.iloc[-1] == "s2_0099"


def test_rerun_does_nothing(scores, result):
    out, _ = result
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith((".parquet",
                                                                                                   ".json", ".faiss"))}
    again = neighbours(scores, out, progress=False)
    assert not again.recomputed
    assert before == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in before}


def test_other_settings_refused(scores, result):
    out, _ = result
    with pytest.raises(ValueError, match="dup_threshold: 0.95 -> 0.9"):
        neighbours(scores, out, NeighboursSettings(dup_threshold=0.9), progress=False)


def test_jobs_in_any_order_write_what_one_job_writes(scores, result, tmp_path):
    out, _ = result
    run = NeighboursRun(scores, str(tmp_path / "two"), NeighboursSettings(rows_per_job=150), progress=False)
    plan = NEIGHBOURS.plan(run)
    jobs = plan.jobs()
    assert [j.stems for j in jobs] == [["000000"], ["000001"], ["000002"]]
    markers = {NEIGHBOURS.job_name(j): NEIGHBOURS.run_job(j) for j in reversed(jobs)}
    NEIGHBOURS.finish(plan, markers, {})
    for s in range(SHARDS):
        a, b = (pq.read_table(os.path.join(d, f"{s:06d}.parquet")) for d in (out, run.out))
        assert a.equals(b) and a.schema.metadata == b.schema.metadata


def test_grown_corpus_recomputes_every_neighbourhood(tmp_path):
    x, thumbs = corpus_arrays(1, n=PER_SHARD * 4)
    scores = write_scores(tmp_path, x, thumbs, shards=2)
    out = str(tmp_path / "out")
    first = neighbours(scores, out, progress=False)
    write_scores(tmp_path, x, thumbs, shards=4)  # two more shards scored
    grown = run_in_order(NEIGHBOURS, NeighboursRun(scores, out), progress=False)
    assert first.summary["rows"] == 200 and grown.recomputed and grown.summary["rows"] == 400
    assert grown.summary["corpus_id"] != first.summary["corpus_id"]
    assert pq.read_table(os.path.join(out, "000000.parquet")).column("group_size").to_pylist()[5] == 12


def test_bad_input_says_what_to_do(tmp_path):
    x, thumbs = corpus_arrays()
    scores = write_scores(tmp_path / "a", x, thumbs, dim_of={2: 16}) if (tmp_path / "a").mkdir() is None else None
    with pytest.raises(ValueError, match="embedding widths differ: 000000 has D=32, 000002 has D=16"):
        neighbours(scores, str(tmp_path / "o1"), progress=False)
    os.remove(os.path.join(scores, names.EMBEDDINGS_DIR, "000002.parquet"))
    with pytest.raises(ValueError, match="1 scored shards have no embeddings file.*000002.*rescore"):
        neighbours(scores, str(tmp_path / "o2"), progress=False)
    os.rename(os.path.join(scores, names.EMBEDDINGS_DIR), os.path.join(scores, "old"))
    with pytest.raises(ValueError, match="rescore with this version of dede score"):
        neighbours(scores, str(tmp_path / "o3"), progress=False)


def test_ivf_recall_against_exact_search():
    """5,000 vectors of a 50-component Gaussian mixture whose variance decays over the dimensions, as embeddings'
    does: the IVF index after a projection to half the dims, at its default nprobe and re-ranking, finds >= 90%
    of the exact 20 nearest (isotropic noise, which no projection keeps, gives about 0.65)."""
    rng = np.random.default_rng(0)
    decay = 1 / np.sqrt(np.arange(1, D + 1))
    x = (rng.normal(size=(50, D))[rng.integers(0, 50, 5000)] + rng.normal(size=(5000, D))) * decay
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    rows = np.arange(5000)
    exact_spec = ix.choose(5000, D, exact_limit=10_000, pca_dim=None, nlist=None, nprobe=None, memory_mib=64)
    ivf_spec = ix.choose(5000, D, exact_limit=1000, pca_dim=16, nlist=None, nprobe=None, memory_mib=64)
    assert ivf_spec.kind == "ivf" and ivf_spec.search_dim == 16 and ivf_spec.nprobe < ivf_spec.nlist
    exact = ix.empty_index(exact_spec)
    exact.add_with_ids(x, rows)
    ivf = ix.empty_index(ivf_spec, x[rng.random(5000) < ivf_spec.train / 5000])
    ix.add_ivf(ivf, x, rows, np.ones(5000, bool))
    truth, _ = ix.search(exact, x, rows, 20)
    found, dist = ix.search(ix.prepare(ivf, ivf_spec, "cpu"), x, rows, 20)
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(truth, found)])
    assert recall >= 0.9, recall
    assert (found != rows[:, None]).all() and np.all(np.diff(dist, axis=1) >= -1e-6)


def test_ivf_stage_finds_the_planted_groups(scores, result, tmp_path):
    """Past exact_limit the stage builds an IVF index over a projection and re-ranks exactly."""
    settings = NeighboursSettings(exact_limit=100, pca_dim=16, nlist=8)
    res = neighbours(scores, tmp_path / "ivf", settings, progress=False)
    assert res.summary["index"]["kind"] == "ivf" and res.summary["index"]["refine"] == 4
    df, exact = read_out(tmp_path / "ivf"), read_out(result[0])
    assert set(df.nsmallest(12, "kdist_5").index) == set(POISON)
    assert res.summary["group_sizes"] == {"10": 1, "12": 1}
    close = np.isclose(df.kdist_20, exact.kdist_20, rtol=1e-3) | df.kdist_20.isna()
    assert close.mean() > 0.9  # the same 20th neighbour's distance, exact from the re-ranking, for most samples


def test_cli_defaults_are_the_settings_and_the_command_runs(scores, tmp_path, capsys):
    from flows.cli import build_parser, main
    from flows.cli.options import neighbours_settings

    args = build_parser().parse_args(["neighbours", scores, "--out", str(tmp_path / "o")])
    assert neighbours_settings(args) == NeighboursSettings()
    assert main(["neighbours", scores, "--out", str(tmp_path / "o"), "--ks", "4,10"]) == 0
    assert "2 tight groups (22 samples)" in capsys.readouterr().out
    assert pq.read_schema(tmp_path / "o" / "000001.parquet").names[4:6] == ["kdist_4", "kdist_10"]
