"""clean: the cleaned shards hold exactly the kept keys, byte for byte; every drop is in rejected.parquet once."""

from __future__ import annotations

import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from dede_core.io import digests
from dede_core.io.tarspans import index_tar
from dede_core.stages.clean import clean
from dede_core.stages.select import Rule
from schemas.manifest import read_manifest
from test_select import png, row, write_scores, write_shards

T = 500.0  # threshold used by most tests


def corpus(tmp_path, with_calibration: bool = False) -> tuple[str, str, dict[str, float | None]]:
    """Two shards of six samples; s1_2 does not decode (decode_error row), s0_5 has no score row at all."""
    shards, samples, rows, scores = [], [], [], {}
    for s in range(2):
        samples = []
        for i in range(6):
            key = f"s{s}_{i}"
            sample = {"__key__": key, "png": png(10 * s + i), "cls": str(i % 2).encode()}
            if i % 3 == 0:
                sample["json"] = json.dumps({"path": f"{key}.png"}).encode()
            samples.append(sample)
            if key == "s1_2":
                sample["png"] = b"not an image"
                rows.append(row(key, f"{s:06d}.tar", i, None, status="decode_error", error="cannot identify image"))
                scores[key] = None
            elif key != "s0_5":
                scores[key] = 100.0 * (i + 1) + s  # 100..601: only s1_4 and s1_5 are above T (s0_4 is exactly T)
                rows.append(row(key, f"{s:06d}.tar", i, scores[key], 0.5))
        shards.append(samples)
    write_shards(str(tmp_path / "shards"), shards)
    calibration = [(float(v), 0.1) for v in range(100, 600)] if with_calibration else None
    write_scores(str(tmp_path / "scores"), rows, calibration)
    return str(tmp_path / "shards"), str(tmp_path / "scores"), scores


def read_samples(paths: list[str]) -> dict[str, dict]:
    out = {}
    for sample in wds.WebDataset(paths, shardshuffle=False):
        out[sample["__key__"]] = {k: v for k, v in sample.items() if not k.startswith("__")}
    return out


def members(path: str) -> list[tuple]:
    with tarfile.open(path) as tar:
        return [(m.name, m.mtime, m.mode, m.uname, tar.extractfile(m).read()) for m in tar]


def tree(folder) -> dict[str, int]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(folder) for f in fs}


def test_clean_keeps_exactly_the_kept_keys_byte_for_byte(tmp_path):
    shards, scores, values = corpus(tmp_path)
    before = tree(tmp_path)
    result = clean(shards, scores, tmp_path / "out", Rule.threshold(T), progress=False)
    out = str(tmp_path / "out")
    kept = sorted(k for k, v in values.items() if v is not None and v <= T)
    names = ["000000.tar", "000001.tar"]
    cleaned = read_samples([os.path.join(out, n) for n in names])
    source = read_samples([os.path.join(shards, n) for n in names])
    assert sorted(cleaned) == kept
    assert all(cleaned[k] == source[k] for k in kept)
    for name in names:  # member order, names, metadata and bytes as in the source
        src = [m for m in members(os.path.join(shards, name)) if m[0].split(".")[0] in kept]
        assert members(os.path.join(out, name)) == src
        assert open(os.path.join(out, name), "rb").read(512) == open(os.path.join(shards, name), "rb").read(512)

    rejected = pq.read_table(os.path.join(out, "rejected.parquet"))
    reasons = dict(zip(rejected.column("key").to_pylist(), rejected.column("reason").to_pylist()))
    assert rejected.num_rows == len(reasons) == 12 - len(kept)
    assert reasons["s0_5"] == "not scored" and reasons["s1_2"] == "decode_error: cannot identify image"
    assert reasons["s1_4"] == "score > 500.00 (threshold)" and "s0_4" not in reasons  # 501 vs 500
    meta = rejected.schema.metadata
    assert meta[b"dede.table"] == b"rejected" and b"threshold" in meta[b"dede.rule"]
    assert json.loads(meta[b"dede.threshold"]) == T

    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["counts"] == {"total": 12, "kept": len(kept), "dropped": 12 - len(kept), "unscored": 2}
    for counts in summary["shards"].values():
        assert counts["total"] == counts["kept"] + counts["dropped"] == 6
    assert summary["threshold"] == T and summary["detector_hash"] and "fixed threshold" in summary["how"]
    assert result.counts.to_dict() == summary["counts"] and result.written == names

    manifest = read_manifest(out)  # the cleaned folder is a valid shards folder
    for entry in manifest.shards:
        data = open(os.path.join(out, entry.name), "rb").read()
        assert entry.bytes == len(data) and entry.digest == digests.of(entry.hash, data)
    assert manifest.samples == len(kept) and manifest.classes == ["a", "b"]
    assert {p for p in tree(tmp_path) if not p.startswith(out)} == set(before)  # nothing written outside OUT
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_rerun_is_a_no_op_and_resumes_a_lost_shard(tmp_path):
    shards, scores, _ = corpus(tmp_path, with_calibration=True)
    out = tmp_path / "out"
    clean(shards, scores, out, progress=False)  # default rule: fpr 0.05 on the calibration scores
    first = tree(out)
    again = clean(shards, scores, out, progress=False)
    assert again.written == [] and tree(out) == first
    cleaned = open(out / "000001.tar", "rb").read()
    os.unlink(out / "_done" / "000001.json")  # as if killed before the marker
    resumed = clean(shards, scores, out, progress=False)
    assert resumed.written == ["000001.tar"] and open(out / "000001.tar", "rb").read() == cleaned
    assert resumed.counts == again.counts


def test_rerun_with_another_rule_is_refused_and_a_rescored_shard_is_cleaned_again(tmp_path):
    shards, scores, _ = corpus(tmp_path)
    out = tmp_path / "out"
    clean(shards, scores, out, Rule.threshold(T), progress=False)
    with pytest.raises(ValueError, match="rule"):
        clean(shards, scores, out, Rule.threshold(T + 50), progress=False)
    with pytest.raises(ValueError, match="keep_unscored"):
        clean(shards, scores, out, Rule.threshold(T), keep_unscored=True, progress=False)
    write_scores(scores, [row("s0_0", "000000.tar", 0, 1.0)])  # rescored: another 000000.parquet
    again = clean(shards, scores, out, Rule.threshold(T), progress=False)
    assert again.written == ["000000.tar"]  # its marker no longer matches its scores; 000001 is left alone
    assert again.by_shard["000000.tar"].kept == 1


def test_keep_unscored_keeps_undecodable_and_unscored_samples(tmp_path):
    shards, scores, values = corpus(tmp_path)
    result = clean(shards, scores, tmp_path / "out", Rule.threshold(T), keep_unscored=True, progress=False)
    kept = set(read_samples([str(tmp_path / "out" / n) for n in ("000000.tar", "000001.tar")]))
    assert {"s0_5", "s1_2"} <= kept
    assert result.counts.unscored == 2 and result.counts.kept == len(kept)


def test_refusals(tmp_path):
    shards, scores, _ = corpus(tmp_path)
    with pytest.raises(ValueError, match="shards or scores folder"):
        clean(shards, scores, shards, Rule.threshold(T), progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        clean(shards, scores, busy, Rule.threshold(T), progress=False)
    os.unlink(os.path.join(scores, "000001.parquet"))
    with pytest.raises(ValueError, match="no scores for 1 shard"):
        clean(shards, scores, tmp_path / "out", Rule.threshold(T), progress=False)


def test_index_tar_groups_members_like_webdataset(tmp_path):
    path = str(tmp_path / "x.tar")
    with wds.TarWriter(path, encoder=False) as w:
        w.write({"__key__": "a/b", "png": b"1", "cls": b"0"})
        w.write({"__key__": "c", "jpg": b"2"})
    index = index_tar(path)
    assert [s.key for s in index.samples] == ["a/b", "c"] and [len(s.spans) for s in index.samples] == [2, 1]
    assert not index.others and not index.gaps
