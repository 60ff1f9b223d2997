"""A corpus that changes between runs: shard, score and clean rerun into the same folders equal one run from
scratch over the final corpus (kept keys, scores, cleaned bytes per key); an unchanged rerun writes nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from conftest import smooth_images
from dede_core.stages.clean import clean
from dede_core.stages.score import score_shards
from dede_core.stages.select import Rule
from dede_core.stages.shard import update_shards
from schemas.manifest import read_manifest

RULE = dataclasses.replace(Rule.fpr(0.2), allow_weak_detector=True)  # 1-epoch test detectors


def png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [png(im) for im in smooth_images(40, seed=3)]


def put(corpus: Path, name: str, image: int) -> None:
    path = corpus / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(IMAGES[image])


def run(corpus: Path, root: Path, detector: str, rule: Rule = RULE):
    update = update_shards(str(corpus), str(root / "shards"), samples_per_shard=4, progress=False)
    scored = score_shards(str(root / "shards"), detector=detector, out_dir=str(root / "scores"), workers=0,
                          batch_size=8, progress=False)
    cleaned = clean(root / "shards", root / "scores", root / "clean", rule, progress=False)
    return update, scored, cleaned


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cleaned_members(clean_dir: Path) -> dict[str, bytes]:
    """'key.ext' -> member bytes over every cleaned shard."""
    out = {}
    for path in sorted(clean_dir.glob("[0-9]*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                assert m.name not in out, f"{m.name} twice in the cleaned corpus"
                out[m.name] = tar.extractfile(m).read()
    return out


def live_scores(root: Path) -> dict[str, tuple]:
    """key -> (status, score, knn_score) of the rows of samples the source still holds."""
    retired = {(r["shard"], r["key"]) for r in read_manifest(root / "shards").retired}
    table = pq.read_table(sorted((root / "scores").glob("[0-9]*.parquet")))
    rows = table.select(["key", "shard", "status", "score", "knn_score"]).to_pylist()
    live = {r["key"]: (r["status"], r["score"], r["knn_score"]) for r in rows if (r["shard"], r["key"]) not in retired}
    assert len(live) == len([r for r in rows if (r["shard"], r["key"]) not in retired])  # no live duplicate
    return live


def test_three_updates_equal_one_run_from_scratch(tmp_path, tiny_detector):
    corpus, root = tmp_path / "corpus", tmp_path / "run"
    for i in range(14):
        put(corpus, f"{'ab'[i % 2]}/img_{i:02d}.png", i)
    first, _, _ = run(corpus, root, tiny_detector)
    assert first.changes.summary()["added"] == 14 and len(first.changes.new_shards) == 4
    shards_before = snapshot(root / "shards")

    # Unchanged corpus: nothing read, nothing written anywhere.
    before = snapshot(root)
    update, scored, cleaned = run(corpus, root, tiny_detector)
    assert (update.changes.unchanged, update.changes.new_shards, scored.scored, cleaned.written) == (14, [], [], [])
    assert snapshot(root) == before

    # Second corpus: 5 added, 2 removed, 2 changed, one file touched without a change.
    for i in range(14, 19):
        put(corpus, f"{'ab'[i % 2]}/img_{i:02d}.png", i)
    (corpus / "b/img_01.png").unlink()
    (corpus / "a/img_04.png").unlink()
    put(corpus, "b/img_03.png", 30)
    put(corpus, "a/img_06.png", 31)
    put(corpus, "a/img_08.png", 8)  # same bytes, new mtime
    update, scored, cleaned = run(corpus, root, tiny_detector)
    assert update.changes.summary() | {"new_shards": None} == {"added": 5, "changed": 2, "removed": 2,
                                                               "unchanged": 10, "new_shards": None}
    assert update.changes.new_shards == ["000004.tar", "000005.tar"]
    assert {k: v for k, v in snapshot(root / "shards").items() if k in shards_before and k.endswith(".tar")} == \
        {k: v for k, v in shards_before.items() if k.endswith(".tar")}  # existing shards byte-identical
    assert scored.scored == ["000004.tar", "000005.tar"]
    # Shards 0, 1 and 2 lost or replaced samples; 4 and 5 are new: only those are cleaned again, 3 is left alone.
    assert cleaned.written == ["000000.tar", "000001.tar", "000002.tar", "000004.tar", "000005.tar"]
    rejected_rows = pq.read_table(root / "clean" / "rejected.parquet").to_pylist()
    reasons = {r["key"]: r["reason"] for r in rejected_rows}
    assert reasons["b/img_01"] == "source_removed" and reasons["a/img_04"] == "source_removed"
    # The old version of a changed sample leaves as source_changed; the new one is judged like any sample: kept in
    # the cleaned shards or dropped for its score, exactly one of the two.
    changed = [r["reason"] for r in rejected_rows if r["key"] == "b/img_03"]
    assert "source_changed" in changed
    kept_new = any(name.startswith("b/img_03.") for name in cleaned_members(root / "clean"))
    assert kept_new != any(reason.startswith("score") for reason in changed)

    # Third corpus: a new class, one more removal, a sample added in run two changed again.
    put(corpus, "c/img_20.png", 20)
    (corpus / "b/img_05.png").unlink()
    put(corpus, "b/img_15.png", 32)
    run(corpus, root, tiny_detector)
    put(corpus, "a/img_16.png", 33)  # fourth update on top: a second version of one added in run two
    update, _, _ = run(corpus, root, tiny_detector)
    assert update.changes.summary()["changed"] == 1

    scratch_corpus, scratch = tmp_path / "final", tmp_path / "scratch"
    shutil.copytree(corpus, scratch_corpus)
    run(scratch_corpus, scratch, tiny_detector)

    kept, kept_scratch = cleaned_members(root / "clean"), cleaned_members(scratch / "clean")
    assert kept.keys() == kept_scratch.keys() and kept == kept_scratch  # same kept keys, same bytes per key
    assert live_scores(root) == live_scores(scratch)  # bitwise-equal scores of every live sample
    threshold = pq.read_metadata(root / "clean" / "rejected.parquet").metadata[b"dede.threshold"]
    assert threshold == pq.read_metadata(scratch / "clean" / "rejected.parquet").metadata[b"dede.threshold"]
    rejected = pq.read_table(root / "clean" / "rejected.parquet").to_pylist()
    retired = read_manifest(root / "shards").retired
    assert {(r["shard"], r["key"], r["reason"]) for r in retired} <= \
        {(r["shard"], r["key"], r["reason"]) for r in rejected}
    assert sum(r["reason"] == "source_changed" for r in rejected) == 4


def test_skipped_entries_are_score_rows_and_killed_runs_temporaries_are_swept(tmp_path, tiny_detector):
    from dede_core.sql import connect, run_query

    corpus, root = tmp_path / "corpus", tmp_path / "run"
    for i in range(6):
        put(corpus, f"a/img_{i:02d}.png", i)
    (tmp_path / "outside.png").write_bytes(IMAGES[7])
    (corpus / "a" / "link.png").symlink_to(tmp_path / "outside.png")
    (corpus / "a" / "odd.png").mkdir()
    _, _, cleaned = run(corpus, root, tiny_detector)
    conn = connect(root / "scores")
    try:
        rows = run_query(conn, "SELECT status, key, shard, error FROM scores WHERE status = 'skipped' ORDER BY key")
        total = run_query(conn, "SELECT count(*) AS n FROM scores").column("n")[0].as_py()
    finally:
        conn.close()
    assert rows.column("key").to_pylist() == ["a/link", "a/odd"] and set(rows.column("shard").to_pylist()) == {""}
    assert "outside the source root" in rows.column("error")[0].as_py()
    assert total == 6 + 2 == cleaned.counts.total + 2  # every input is a row; only shard samples are cleaned
    rejected = pq.read_table(root / "clean" / "rejected.parquet").column("key").to_pylist()
    assert "a/link" not in rejected  # not a sample of any shard: nothing to clean

    stale = [root / "shards" / ".000001.tar.k1ll3d.tmp", root / "scores" / ".000000.parquet.k1ll3d.tmp",
             root / "scores" / "_done" / ".000000.json.k1ll3d.tmp", root / "clean" / "rejected.parquet.4242.tmp",
             root / "clean" / "_done" / "000000.rejected.parquet.4242.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    update, scored, cleaned = run(corpus, root, tiny_detector)
    assert (update.changes.new_shards, scored.scored, cleaned.written) == ([], [], [])
    assert not [p for p in stale if p.exists()]


def test_parquet_rows_are_fingerprinted_and_a_rerun_finds_what_changed(tmp_path):
    import pyarrow as pa

    def write(rows: list[bytes | None]) -> None:
        pq.write_table(pa.table({"image": pa.array(rows, pa.binary())}), tmp_path / "data.parquet")

    write([IMAGES[0], IMAGES[1], None, IMAGES[3]])
    out = tmp_path / "shards"
    first = update_shards(str(tmp_path / "data.parquet"), str(out), samples_per_shard=2, progress=False)
    assert first.changes.summary()["added"] == 3 and len(first.manifest.skipped) == 1
    before = snapshot(out)
    again = update_shards(str(tmp_path / "data.parquet"), str(out), samples_per_shard=2, progress=False)
    assert again.changes.unchanged == 3 and snapshot(out) == before  # stat unchanged: nothing read or written
    write([IMAGES[0], IMAGES[5], None, IMAGES[3], IMAGES[6]])  # row 1 changed, row 4 added
    update = update_shards(str(tmp_path / "data.parquet"), str(out), samples_per_shard=2, progress=False)
    assert (update.changes.added, update.changes.changed, update.changes.unchanged) == (["data_00000004"],
                                                                                        ["data_00000001"], 2)
    assert update.manifest.retired == [{"key": "data_00000001", "shard": "000000.tar", "reason": "source_changed"}]
    assert {k: v for k, v in snapshot(out).items() if k.endswith(".tar") and k in before} == \
        {k: v for k, v in before.items() if k.endswith(".tar")}


def test_the_verdict_rule_on_a_grown_corpus_equals_one_run_from_scratch(tmp_path, tiny_detector):
    """Under --fdr a sample's verdict depends on the whole corpus: a shard whose drops change is cleaned again,
    so the grown corpus' cleaned shards and verdicts equal a run from scratch."""
    rule = dataclasses.replace(Rule.fdr(0.05), allow_weak_detector=True)
    corpus, root = tmp_path / "corpus", tmp_path / "run"
    for i in range(12):
        put(corpus, f"{'ab'[i % 2]}/img_{i:02d}.png", i)
    run(corpus, root, tiny_detector, rule)
    for i in range(12, 30):
        put(corpus, f"{'ab'[i % 2]}/img_{i:02d}.png", i)
    _, _, cleaned = run(corpus, root, tiny_detector, rule)
    assert "000003.tar" in cleaned.written and cleaned.selection.verdict.summary["samples"] == 30
    scratch_corpus, scratch = tmp_path / "final", tmp_path / "scratch"
    shutil.copytree(corpus, scratch_corpus)
    run(scratch_corpus, scratch, tiny_detector, rule)
    assert cleaned_members(root / "clean") == cleaned_members(scratch / "clean")
    by_key = [{r["key"]: {k: v for k, v in r.items() if k != "shard"}  # the shards hold other groups of samples
               for r in pq.read_table(folder / "clean" / "verdict.parquet").to_pylist()} for folder in (root, scratch)]
    assert by_key[0] == by_key[1] and len(by_key[0]) == 30
