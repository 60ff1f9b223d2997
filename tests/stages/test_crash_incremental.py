"""SIGKILL at seeded moments on the incremental path: `dede shard` bringing a shards folder up to date with a
corpus that grew and changed, and `dede clean` cleaning the grown shards into a folder cleaned before. After each
kill the rerun ends exactly like the uninterrupted update (the same shard bytes, source index and manifest; the
same cleaned tars, rejected table and markers). Uses the forked-zygote processes of test_crash_consistency."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import smooth_images
from dede_core.stages.clean import clean
from dede_core.detector.config import cpu
from dede_core.stages.score import score_shards
from dede_core.stages.select import Rule
from dede_core.stages.shard import update_shards
from dede_core.io.sources import open_source
from dede_core.detector.train import TrainConfig, train_detector
from test_crash_consistency import (ROOT, TINY, ZYGOTE, Zygote, check_clean_folder, finals, markers, png,
                                    read_json, without)

TRIALS = 8
SPS = 3  # samples per shard: many small shards, so a kill lands between them


class ShardZygote(Zygote):
    """The zygote with the shard stage imported too, so a kill lands in its work, not in imports."""

    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        code = ZYGOTE.replace("import dede_core.stages.clean,", "import dede_core.stages.shard, dede_core.stages.clean,")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=ROOT, env=env, bufsize=0)
        self.buffer = b""
        self.pid = None


@pytest.fixture(scope="module")
def zygote():
    z = ShardZygote()
    yield z
    z.close()


def timed(zygote: Zygote, argv: list, log: Path) -> float:
    zygote.start(argv, log)
    rc = zygote.wait()
    assert rc == 0, log.read_text()
    return time.perf_counter() - zygote.started


@pytest.fixture(scope="module")
def grown(tmp_path_factory, encoder, zygote) -> dict:
    """A corpus sharded, scored and cleaned, then grown (40 added, 2 removed, 2 changed) and the update done
    uninterrupted: the reference every killed run must end at."""
    root = tmp_path_factory.mktemp("crash-incremental")
    corpus, images = root / "corpus", [png(im) for im in smooth_images(74, seed=5)]
    corpus.mkdir()
    for i in range(30):
        (corpus / f"img_{i:02d}.png").write_bytes(images[i])
    shards, scores = root / "shards", root / "scores"
    update_shards(str(corpus), str(shards), samples_per_shard=SPS, progress=False)
    detector = train_detector(source=open_source(str(corpus)), data_id="crash-inc", encoder=encoder,
                              config=cpu(**TINY), train=TrainConfig(epochs=1, batch_size=16, holdout=6, knn_bank=20),
                              out_dir=root / "detector")
    score = dict(detector=str(detector), workers=0, batch_size=8, knn_k=3, progress=False)
    score_shards(str(shards), out_dir=str(scores), **score)
    clean(shards, scores, root / "clean_before", dataclasses.replace(Rule.fpr(0.2), allow_weak_detector=True),
          progress=False)
    shutil.copytree(shards, root / "shards_before")
    for i in range(30, 70):
        (corpus / f"img_{i:02d}.png").write_bytes(images[i])
    (corpus / "img_03.png").unlink()
    (corpus / "img_17.png").unlink()
    (corpus / "img_05.png").write_bytes(images[70])
    (corpus / "img_22.png").write_bytes(images[71])
    zygote.ready()
    shard_argv = ["shard", corpus, "--samples-per-shard", str(SPS)]
    shard_time = timed(zygote, shard_argv + ["--out", shards], root / "shard.log")
    score_shards(str(shards), out_dir=str(scores), **score)
    shutil.copytree(root / "clean_before", root / "clean")
    clean_argv = ["clean", "--allow-weak-detector", shards, "--scores", scores, "--fpr", "0.2", "--no-report"]
    clean_time = timed(zygote, clean_argv + ["--out", root / "clean"], root / "clean.log")
    return {"root": root, "shards": shards, "shard_argv": shard_argv, "shard_time": shard_time,
            "clean_argv": clean_argv, "clean_time": clean_time}


def check_shards_folder(out: Path, ref: Path) -> None:
    """The rerun's shards folder equals the reference: same files, same bytes; the manifest but its times."""
    assert [p.relative_to(out) for p in finals(out)] == [p.relative_to(ref) for p in finals(ref)]
    for path in finals(out):
        rel = path.relative_to(out)
        if rel.name == "manifest.json":
            mine, theirs = read_json(path), read_json(ref / rel)
            assert without(mine, "created", "changes") == without(theirs, "created", "changes")
            assert without(mine["changes"], "at") == without(theirs["changes"], "at")
        else:
            assert path.read_bytes() == (ref / rel).read_bytes(), rel
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def killed(zygote: Zygote, argv: list, log: Path, delay: float, progress: Callable[[], int], after: int) -> int:
    """Start the command, wait until progress() reaches `after` (new shards or markers), then `delay` seconds,
    and SIGKILL it: its status."""
    zygote.start(argv, log)
    while progress() < after:
        if (rc := zygote.wait(0.001)) is not None:
            return rc
    rc = zygote.wait(delay)
    return zygote.kill() if rc is None else rc


def plan(seed: int, total: int, seconds: float) -> list[tuple[int, float]]:
    """TRIALS moments: half at a random time of the whole run, half right after a random piece of work."""
    rng = random.Random(seed)
    return [(0, rng.uniform(0, seconds)) if t % 2 else (rng.randint(1, total - 1), rng.uniform(0, 0.01))
            for t in range(TRIALS)]


def test_killed_shard_update_reruns_to_the_uninterrupted_update(grown, zygote, tmp_path):
    seen, before = [], len(list((grown["root"] / "shards_before").glob("*.tar")))
    new = len(list(grown["shards"].glob("*.tar"))) - before
    for trial, (after, delay) in enumerate(plan(12, new, grown["shard_time"])):
        out = tmp_path / f"shards{trial}"
        shutil.copytree(grown["root"] / "shards_before", out)
        rc = killed(zygote, grown["shard_argv"] + ["--out", out], tmp_path / "kill.log", delay,
                    lambda: len(list(out.glob("*.tar"))) - before, after)
        seen.append((rc, len(list(out.glob("*.tar"))), read_json(out / "manifest.json")["samples"]
                     if (out / "manifest.json").exists() else None))
        assert zygote.run(grown["shard_argv"] + ["--out", out], tmp_path / "rerun.log") == 0
        check_shards_folder(out, grown["shards"])
    assert len({tars for rc, tars, _ in seen if rc == -signal.SIGKILL}) >= 3, f"too few states caught: {seen}"
    print("shard update kills (status, shards on disk, manifest samples):", seen)


def test_killed_clean_of_grown_shards_reruns_to_the_uninterrupted_clean(grown, zygote, tmp_path):
    seen, before = [], markers(grown["root"] / "clean_before")
    new = markers(grown["root"] / "clean") - before
    for trial, (after, delay) in enumerate(plan(13, new, grown["clean_time"])):
        out = tmp_path / f"clean{trial}"
        shutil.copytree(grown["root"] / "clean_before", out)
        rc = killed(zygote, grown["clean_argv"] + ["--out", out], tmp_path / "kill.log", delay,
                    lambda: markers(out) - before, after)
        seen.append((rc, markers(out)))
        assert zygote.run(grown["clean_argv"] + ["--out", out], tmp_path / "rerun.log") == 0
        assert check_clean_folder(out, grown["root"] / "clean") == len(list(grown["shards"].glob("*.tar")))
    assert len({done for rc, done in seen if rc == -signal.SIGKILL}) >= 3, f"too few states caught: {seen}"
    print("clean kills (status, markers):", seen)
