import shutil

import numpy as np

import pyarrow.parquet as pq
import pytest
import torch

from dede_core.detector.checkpoint import load_detector
from dede_core.detector.config import cpu
from dede_core.io.images import decode_image
from dede_core.detector.knn import knn_distance
from dede_core.stages import score as score_mod, score_batches
from dede_core.stages.score import score_shards
from dede_core.detector.scorer import ScoreConfig, Scorer
from dede_core.stages.shard import write_shards
from dede_core.io.sources import TarShardSource, open_source
from dede_core.detector.train import TrainConfig, train_detector
from dede_core.stages.embeddings import read_embeddings, thumbnails
from schemas.tables import embeddings_schema, scores_schema

from conftest import on_dede_log

TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
CONFIG = ScoreConfig(draws=2, visible=4, chunk=8)  # visible patches and 2 draws: masks depend on the key


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second torch thread only waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def detector(tmp_path_factory, image_folder, encoder) -> str:
    out = tmp_path_factory.mktemp("detector")
    return str(train_detector(source=open_source(str(image_folder)), data_id="tiny", encoder=encoder,
                              config=cpu(**TINY), train=TrainConfig(epochs=1, batch_size=16, holdout=6, knn_bank=30),
                              out_dir=out))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, image_folder) -> str:
    out = tmp_path_factory.mktemp("shards")
    write_shards(str(image_folder), str(out), samples_per_shard=20, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, shards, detector):
    out = tmp_path_factory.mktemp("scores")
    result = score_shards(shards, detector=detector, out_dir=str(out), score=CONFIG, knn_k=3, batch_size=7,
                          workers=0, progress=False)
    return out, result


def table(out, stem="*"):
    return pq.read_table(sorted(out.glob("[0-9]*.parquet")) if stem == "*" else out / f"{stem}.parquet")


def test_end_to_end_matches_the_scorer(scored, detector, image_folder):
    out, result = scored
    assert result.scored == ["000000.tar", "000001.tar", "000002.tar"] and result.skipped == []
    assert result.samples == result.ok == 48 and not result.failed
    for stem, n in (("000000", 20), ("000001", 20), ("000002", 8)):
        t = table(out, stem)
        assert t.schema.equals(scores_schema(False)) and t.schema.metadata[b"dede.table"] == b"scores"
        assert t.column("position").to_pylist() == list(range(n)) and (out / "_done" / f"{stem}.json").exists()
    rows = table(out).to_pylist()
    source = open_source(str(image_folder))
    assert [r["key"] for r in rows] == source.keys()
    model, encoder, ckpt = load_detector(detector)
    images = torch.stack([decode_image(source[i].data, size=32, channels=3) for i in range(len(source))])
    direct = Scorer(detector=model, encoder=encoder, config=CONFIG, references=ckpt.knn_bank).score(
        images, source.keys())
    assert torch.equal(torch.tensor([r["score"] for r in rows], dtype=torch.float32), direct.score)
    assert torch.equal(torch.tensor([r["recon_error"] for r in rows], dtype=torch.float32), direct.error)
    knn = knn_distance(direct.embedding, ckpt.knn_bank, 3, chunk=CONFIG.chunk)
    assert torch.equal(torch.tensor([r["knn_score"] for r in rows], dtype=torch.float32), knn)
    brute = (direct.embedding[:, None] - ckpt.knn_bank.float()[None]).norm(dim=2).sort(dim=1).values[:, 2]
    assert torch.allclose(knn, brute, rtol=1e-4)
    assert [r["label"] for r in rows] == [source[i].label for i in range(48)]
    assert {(r["width"], r["height"], r["status"], r["draws"]) for r in rows} == {(32, 32, "ok", 2)}
    assert rows[0]["encoder_id"] == f"{ckpt.encoder_spec}#{ckpt.encoder_fingerprint[:16]}"
    calibration = pq.read_table(out / "calibration.parquet")
    assert calibration.column("key").to_pylist() == ckpt.calibration_keys and calibration.num_rows == 6


def test_every_shard_keeps_its_embeddings_and_thumbnails(scored, detector, image_folder):
    out, _ = scored
    model, encoder, ckpt = load_detector(detector)
    source = open_source(str(image_folder))
    images = torch.stack([decode_image(source[i].data, size=32, channels=3) for i in range(len(source))])
    keys, vectors, thumbs = [], [], []
    for stem in ("000000", "000001", "000002"):
        t = pq.read_table(out / "embeddings" / f"{stem}.parquet")
        assert t.schema.equals(embeddings_schema(encoder.dim))
        assert t.column("key").to_pylist() == table(out, stem).column("key").to_pylist()
        part_keys, part_vectors, part_thumbs = read_embeddings(str(out / "embeddings" / f"{stem}.parquet"))
        keys += part_keys.column("key").to_pylist()
        vectors.append(part_vectors)
        thumbs.append(part_thumbs)
    direct = Scorer(detector=model, encoder=encoder, config=CONFIG, references=ckpt.knn_bank).score(
        images, source.keys())
    assert keys == source.keys()
    assert torch.allclose(torch.from_numpy(np.concatenate(vectors)), direct.embedding.half().float())
    assert np.array_equal(np.concatenate(thumbs), thumbnails(images)) and np.concatenate(thumbs).shape == (48, 256)


def test_thumbnails_tell_copies_from_other_pictures():
    picture = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    copy = torch.nn.functional.interpolate(picture.float(), size=32, mode="area")
    copy = torch.nn.functional.interpolate(copy, size=64, mode="nearest").round().to(torch.uint8)  # resized
    other = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    a, b, c = (thumbnails(x)[0].astype(float) for x in (picture, copy, other))
    assert np.corrcoef(a, b)[0, 1] > 0.95 > np.corrcoef(a, c)[0, 1]


def test_batches_across_shards_and_workers_give_the_same_scores(tmp_path, scored, shards, detector, encoder):
    out, _ = scored
    score_shards(shards, detector=detector, out_dir=str(tmp_path), score=CONFIG, knn_k=3, batch_size=64,
                 workers=2, with_embedding=True, progress=False)
    wide = table(tmp_path)
    assert wide.select(table(out).column_names).equals(table(out))
    assert {len(e) for e in wide.column("embedding").to_pylist()} == {encoder.dim}


def test_windows_of_shards_give_the_same_scores_and_bound_what_is_indexed(tmp_path, scored, shards, detector,
                                                                          monkeypatch):
    """A job takes its shards a window at a time: only the window's shards are indexed at once, and the scores are
    those of one window over the whole job."""
    out, _ = scored
    opened = []
    real_open = score_batches.open_parts
    monkeypatch.setattr(score_batches, "WINDOW", 25)  # the 20-sample shards go in windows of two, then one
    monkeypatch.setattr(score_mod, "open_parts", lambda d, m, todo, *rest: opened.append(
        [e.name for e in todo]) or real_open(d, m, todo, *rest))
    lines = []
    with on_dede_log(lines.append):
        result = score_shards(shards, detector=detector, out_dir=str(tmp_path), score=CONFIG, knn_k=3, batch_size=7,
                              workers=0, progress=True)
    assert opened == [["000000.tar", "000001.tar"], ["000002.tar"]]
    assert result.scored == ["000000.tar", "000001.tar", "000002.tar"] and result.samples == 48
    assert table(tmp_path).equals(table(out))
    assert any("scoring 48/48 img" in line and "shards 3/3" in line for line in lines), lines


def test_rerun_does_no_work_and_a_lost_shard_is_rescored_identically(tmp_path, scored, shards, detector):
    copy = tmp_path / "scores"
    shutil.copytree(scored[0], copy)
    stamps = {p: p.stat().st_mtime_ns for p in copy.rglob("*")}
    run = lambda: score_shards(shards, detector=detector, out_dir=str(copy), score=CONFIG, knn_k=3,  # noqa: E731
                               batch_size=7, workers=0, progress=False)
    again = run()
    assert again.skipped == ["000000.tar", "000001.tar", "000002.tar"] and again.scored == [] and again.samples == 0
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == stamps
    before = (copy / "000001.parquet").read_bytes()
    (copy / "000001.parquet").unlink()
    (copy / "_done" / "000001.json").unlink()
    redo = run()
    assert redo.scored == ["000001.tar"] and redo.samples == 20
    assert (copy / "000001.parquet").read_bytes() == before
    assert (copy / "000000.parquet").stat().st_mtime_ns == stamps[copy / "000000.parquet"]


def test_other_settings_are_refused(scored, shards, detector):
    out, _ = scored
    with pytest.raises(ValueError, match=r"score\.draws: 2 -> 3"):
        score_shards(shards, detector=detector, out_dir=str(out), score=ScoreConfig(draws=3, visible=4, chunk=8),
                     knn_k=3, workers=0, progress=False)
    with pytest.raises(ValueError, match="knn_k: 3 -> 2"):
        score_shards(shards, detector=detector, out_dir=str(out), score=CONFIG, knn_k=2, workers=0, progress=False)
    bf16 = ScoreConfig(draws=2, visible=4, chunk=8, cpu_bf16=True)  # other numerics: never mixed with fp32 scores
    with pytest.raises(ValueError, match=r"score\.cpu_bf16: None -> True"):
        score_shards(shards, detector=detector, out_dir=str(out), score=bf16, knn_k=3, workers=0, progress=False)


def test_bad_image_and_truncated_shard_are_recorded(tmp_path, image_folder, detector):
    folder = tmp_path / "corpus"
    shutil.copytree(image_folder / "a", folder / "a")
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    write_shards(str(folder), str(tmp_path / "shards"), samples_per_shard=10, progress=False)  # 10 / 10 / 5
    tar = tmp_path / "shards" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    run = lambda: score_shards(str(tmp_path / "shards"), detector=detector, out_dir=str(tmp_path / "out"),  # noqa
                               workers=0, batch_size=8, progress=False)
    result = run()
    assert result.scored == ["000000.tar", "000002.tar"] and list(result.failed) == ["000001.tar"]
    assert "bytes but the manifest says" in result.failed["000001.tar"]
    assert (tmp_path / "out" / "_failed" / "000001.json").exists()
    assert result.decode_errors == 1 and result.ok == 14
    bad = [r for r in table(tmp_path / "out").to_pylist() if r["key"] == "a/broken"][0]
    assert bad["status"] == "decode_error" and "image" in bad["error"]
    assert bad["score"] is None and bad["knn_score"] is None and bad["width"] is None
    assert run().skipped == ["000000.tar", "000002.tar"]  # the broken shard is retried, the rest left alone


def test_subsets_for_parallel_workers(tmp_path, shards, detector, scored):
    out = tmp_path / "scores"
    first = score_shards(shards, detector=detector, out_dir=str(out), score=CONFIG, knn_k=3, shards=[],
                         workers=0, progress=False)
    assert first.scored == [] and (out / "run.json").exists() and (out / "calibration.parquet").exists()
    part = score_shards(shards, detector=detector, out_dir=str(out), score=CONFIG, knn_k=3, shards=["000002"],
                        workers=0, progress=False)
    assert part.scored == ["000002.tar"] and [p.name for p in out.glob("[0-9]*.parquet")] == ["000002.parquet"]
    assert table(out, "000002").equals(table(scored[0], "000002"))
    with pytest.raises(ValueError, match="not in the manifest"):
        score_shards(shards, detector=detector, out_dir=str(out), score=CONFIG, knn_k=3, shards=["000009.tar"])


def test_source_refs_read_the_index_once_and_only_when_asked(shards):
    """The source index answers for samples whose .json names no source (older shards): read on first need, kept as
    Arrow columns, looked up by key."""
    refs = score_batches.SourceRefs(shards)
    assert refs.lookup([]) == {} and not refs.loaded  # shards that name their sources never read it
    source = TarShardSource([f"{shards}/000000.tar"])
    keys = source.keys()[:3]
    assert refs.lookup(keys + ["no-such-key"]) == {k: source.meta(i)["source"] for i, k in enumerate(keys)}
    assert refs.loaded and refs.table.num_rows == 48 and refs.table.column_names == ["key", "item"]
