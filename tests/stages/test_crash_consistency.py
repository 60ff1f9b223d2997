"""Crash consistency: `dede score`, `dede clean` and `dede train` killed with SIGKILL at seeded random moments.

After each kill every file under a final name is complete (it parses, and equals what an uninterrupted run
wrote); the rerun then ends exactly like the uninterrupted run: the same keys, bitwise equal scores, byte-equal
cleaned tars, the same rejected table, no duplicate row and no missing sample. A killed `dede train` resumes
from its last checkpoint and ends with the same weights as a run that was never killed.

The commands run in real processes forked from a "zygote" that imported dede once, so a kill lands in dede's
work rather than in Python's imports (importing torch takes longer here than scoring the whole tiny corpus).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import smooth_images
from dede_core.io import digests
from dede_core.detector.checkpoint import load_checkpoint, load_payload
from dede_core.detector.config import cpu
from dede_core.stages.shard import write_shards
from dede_core.io.sources import open_source
from dede_core.detector.train import TrainConfig, train_detector
from schemas.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
TRIALS = 10  # kills per command
SHARDS = 6  # 60 samples, 10 per shard

# Runs `dede` (flows.cli.main, the console script) in a forked child per job line on stdin; reports the child's
# pid, then its exit status (negative: killed by that signal). Nothing runs torch before the fork.
ZYGOTE = r"""
import json, os, sys, traceback
import torch
import dede_core.stages.clean, dede_core.stages.report, dede_core.stages.score, dede_core.detector.train
from flows.cli import main
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            torch.set_num_threads(1)
            code = main(job["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Zygote:
    """One `dede` command at a time in a process forked from a warm interpreter; it can be SIGKILLed."""

    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=ROOT, env=env, bufsize=0)
        self.buffer = b""
        self.pid: int | None = None

    def _line(self, timeout: float) -> str | None:
        """The next line the zygote printed, or None when none came within timeout seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, "the zygote died"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def ready(self) -> None:
        assert self._line(300) == "ready"

    def start(self, argv: list[str], log: Path) -> None:
        self.proc.stdin.write((json.dumps({"argv": [str(a) for a in argv], "log": str(log)}) + "\n").encode())
        self.pid = int(self._line(60))
        self.started = time.perf_counter()

    def wait(self, timeout: float = 300) -> int | None:
        """The exit status (negative: the signal that killed it), or None if still running after timeout."""
        line = self._line(timeout)
        return None if line is None else int(line)

    def kill(self) -> int:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:  # it finished just now
            pass
        return self.wait()

    def run(self, argv: list, log: Path) -> int:
        """The command to its end: its exit status."""
        self.start(argv, log)
        rc = self.wait()
        assert rc is not None, f"{argv[0]} did not finish: {log.read_text()}"
        return rc

    def close(self) -> None:
        self.proc.stdin.close()  # its loop ends
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, encoder, zygote) -> dict:
    """60 samples (2 undecodable) in 6 shards of 10, a tiny detector, and uninterrupted score and clean runs."""
    root = tmp_path_factory.mktemp("crash")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, image in enumerate(smooth_images(58, seed=11)):
        (corpus / f"img_{i:02d}.png").write_bytes(png(image))
    (corpus / "broken_a.png").write_bytes(png(smooth_images(1)[0])[:100])  # truncated
    (corpus / "broken_b.png").write_bytes(b"not an image at all")
    write_shards(str(corpus), str(root / "shards"), samples_per_shard=10, progress=False)
    detector = train_detector(source=open_source(str(corpus)), data_id="crash", encoder=encoder, config=cpu(**TINY),
                              train=TrainConfig(epochs=1, batch_size=16, holdout=6, knn_bank=20),
                              out_dir=root / "detector")
    zygote.ready()
    p = {"root": root, "corpus": corpus, "shards": root / "shards", "detector": detector}
    p["score"] = ["score", p["shards"], "--detector", detector, "--workers", "0", "--batch-size", "3", "--chunk", "8",
                  "--knn-k", "3", "--device", "cpu"]
    p["score_times"] = timeline(zygote, p["score"] + ["--out", root / "scores"], root / "score.log", root / "scores")
    p["clean"] = ["clean", "--allow-weak-detector", p["shards"], "--scores", root / "scores", "--quantile", "0.8", "--no-report"]
    p["clean_times"] = timeline(zygote, p["clean"] + ["--out", root / "clean"], root / "clean.log", root / "clean")
    p["inputs"] = snapshot(root / "shards") | snapshot(root / "scores")
    return p


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def finals(folder: Path) -> list[Path]:
    """Files under their final names: everything but the temporaries (.NAME.XXX.tmp, NAME.PID.tmp) a writer
    renames from."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(".tmp"))


def same_table(path: Path, reference: Path) -> None:
    table = pq.read_table(path)  # reads every page: a cut file fails here
    assert table.equals(pq.read_table(reference), check_metadata=True), path


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def without(data: dict, *names: str) -> dict:
    return {k: v for k, v in data.items() if k not in names}


def check_scores_folder(out: Path, ref: Path) -> int:
    """Every final-named file of a (maybe killed) scores folder is whole and equals the reference's;
    returns how many shards were finished (marker and Parquet)."""
    done = 0
    for path in finals(out):
        rel = path.relative_to(out)
        if path.suffix == ".parquet":
            same_table(path, ref / rel)
        elif rel.parts[0] == "_done":
            marker = read_json(path)
            assert (out / f"{path.stem}.parquet").is_file(), f"marker {rel} written before its Parquet file"
            assert without(marker, "elapsed_s") == without(read_json(ref / rel), "elapsed_s")
            done += 1
        elif rel == Path("run.json"):
            assert read_json(path) == read_json(ref / rel)
        else:
            pytest.fail(f"unexpected file {rel} in {out}")
    return done


def check_clean_folder(out: Path, ref: Path) -> int:
    """The same for a clean folder: tars byte-equal to the reference's and to their markers' digest."""
    done = 0
    for path in finals(out):
        rel = path.relative_to(out)
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                tar.getmembers()  # the whole archive lists
            assert path.read_bytes() == (ref / rel).read_bytes(), rel
        elif path.suffix == ".parquet":
            same_table(path, ref / rel)
        elif rel.parts[0] == "_done":
            marker = read_json(path)
            tar = out / marker["shard"]
            assert digests.of(digests.HASH, tar.read_bytes()) == marker[digests.HASH], f"{rel} before its tar"
            assert (out / "_done" / f"{path.stem}.rejected.parquet").is_file()
            assert marker == read_json(ref / rel)
            done += 1
        elif rel.name in ("summary.json", "manifest.json"):
            assert without(read_json(path), "created") == without(read_json(ref / rel), "created")
            if rel.name == "manifest.json":  # written last: the folder it describes is complete
                for entry in read_manifest(out).shards:
                    assert digests.of(entry.hash, (out / entry.name).read_bytes()) == entry.digest
                assert (out / "rejected.parquet").is_file() and (out / "summary.json").is_file()
        elif rel.name == "clean_config.json":
            assert read_json(path) == read_json(ref / rel)
        else:
            pytest.fail(f"unexpected file {rel} in {out}")
    return done


def markers(out: Path) -> int:
    """Shards a (score or clean) run has finished: its _done/<stem>.json markers."""
    return len(list((out / "_done").glob("*.json")))


def timeline(zygote: Zygote, argv: list, log: Path, out: Path) -> list[float]:
    """Run to the end, watching the folder: seconds from the start to each shard marker, then to the exit."""
    zygote.start(argv, log)
    times = []
    while (rc := zygote.wait(0.002)) is None:
        times += [time.perf_counter() - zygote.started] * (markers(out) - len(times))
    assert rc == 0, log.read_text()
    end = time.perf_counter() - zygote.started
    return times + [end] * (SHARDS + 1 - len(times))


def kill_plan(seed: int, times: list[float]) -> list[tuple[int, float]]:
    """TRIALS seeded random moments of an uninterrupted run, spread over its phases (before the first marker,
    between markers, after the last): (markers to wait for, then seconds to wait within that phase)."""
    rng, bounds = random.Random(seed), [0.0] + times
    phases = [i * (SHARDS + 1) // TRIALS for i in range(TRIALS)]
    return [(k, rng.uniform(0, bounds[k + 1] - bounds[k])) for k in phases]


def killed_run(zygote: Zygote, argv: list, log: Path, out: Path, after: int, delay: float) -> int:
    """Start the command, wait for `after` shard markers and then `delay` seconds, SIGKILL it: its status."""
    zygote.start(argv, log)
    while markers(out) < after:
        if (rc := zygote.wait(0.002)) is not None:
            return rc
    rc = zygote.wait(delay)
    return zygote.kill() if rc is None else rc


def test_killed_score_reruns_to_the_uninterrupted_result(pipeline, zygote, tmp_path):
    ref = pipeline["root"] / "scores"
    keys = [k for e in read_manifest(pipeline["shards"]).shards for k in open_source(
        str(pipeline["shards"] / e.name)).keys()]
    seen = []
    for trial, (after, delay) in enumerate(kill_plan(1, pipeline["score_times"])):
        out = tmp_path / f"scores{trial}"
        rc = killed_run(zygote, pipeline["score"] + ["--out", out], tmp_path / "kill.log", out, after, delay)
        seen.append((after, round(delay, 3), rc, check_scores_folder(out, ref) if out.exists() else None))
        rc = zygote.run(pipeline["score"] + ["--out", out], tmp_path / "rerun.log")
        assert rc == 0, (tmp_path / "rerun.log").read_text()
        assert [p.relative_to(out) for p in finals(out)] == [p.relative_to(ref) for p in finals(ref)]
        assert check_scores_folder(out, ref) == SHARDS
        rows = pq.read_table(sorted(out.glob("[0-9]*.parquet")), columns=["key"]).column("key").to_pylist()
        assert rows == keys and len(set(rows)) == 60  # no duplicate, none missing, shard order
    assert len({done for _, _, rc, done in seen if rc == -signal.SIGKILL}) >= 3, f"too few states caught: {seen}"
    assert pipeline["inputs"] == snapshot(pipeline["shards"]) | snapshot(ref)
    print("score kills (after markers, then s, status, shards done):", seen)


def test_killed_clean_reruns_to_the_uninterrupted_result(pipeline, zygote, tmp_path):
    ref = pipeline["root"] / "clean"
    seen = []
    for trial, (after, delay) in enumerate(kill_plan(2, pipeline["clean_times"])):
        out = tmp_path / f"clean{trial}"
        rc = killed_run(zygote, pipeline["clean"] + ["--out", out], tmp_path / "kill.log", out, after, delay)
        seen.append((after, round(delay, 3), rc, check_clean_folder(out, ref) if out.exists() else None))
        rc = zygote.run(pipeline["clean"] + ["--out", out], tmp_path / "rerun.log")
        assert rc == 0, (tmp_path / "rerun.log").read_text()
        assert [p.relative_to(out) for p in finals(out)] == [p.relative_to(ref) for p in finals(ref)]
        assert check_clean_folder(out, ref) == SHARDS
        rejected = pq.read_table(out / "rejected.parquet").column("key").to_pylist()
        kept = [k for e in read_manifest(out).shards for k in open_source(str(out / e.name)).keys()]
        assert len(set(rejected)) == len(rejected) and not set(rejected) & set(kept)
        assert len(rejected) + len(kept) == 60  # every sample is kept or rejected, exactly once
    assert len({done for _, _, rc, done in seen if rc == -signal.SIGKILL}) >= 3, f"too few states caught: {seen}"
    assert pipeline["inputs"] == snapshot(pipeline["shards"]) | snapshot(pipeline["root"] / "scores")
    print("clean kills (after markers, then s, status, shards done):", seen)


def test_clean_resumes_after_a_kill_while_claiming_its_folder(pipeline, zygote, tmp_path):
    """A kill while clean_config.json is written leaves only its temporary file: the rerun must go on."""
    out = tmp_path / "clean"
    out.mkdir()
    (out / ".clean_config.json.k1ll3d.tmp").write_text('{"identity": {"form')
    rc = zygote.run(pipeline["clean"] + ["--out", out], tmp_path / "log")
    assert rc == 0, (tmp_path / "log").read_text()
    assert check_clean_folder(out, pipeline["root"] / "clean") == SHARDS


def test_killed_train_resumes_from_its_last_checkpoint(pipeline, zygote, encoder_spec, tmp_path):
    train = ["train", pipeline["corpus"], "--encoder", encoder_spec, "--batch-size", "16", "--workers", "0",
             "--threads", "1", "--device", "cpu"]
    killed = tmp_path / "killed"
    zygote.start(train + ["--out", killed, "--epochs", "50"], tmp_path / "kill.log")
    ckpt, deadline = killed / "detector.pt", time.monotonic() + 120
    while not ckpt.exists():
        assert zygote.wait(0.02) is None and time.monotonic() < deadline, (tmp_path / "kill.log").read_text()
    time.sleep(random.Random(3).uniform(0, 0.5))
    assert zygote.kill() == -signal.SIGKILL
    assert [p.name for p in finals(killed)] == ["aux_cache.pt", "detector.pt"]
    load_payload(killed / "aux_cache.pt")
    last = load_checkpoint(ckpt)  # complete: it passes its content hash
    epoch = last.meta["epoch"]
    assert 1 <= epoch < 50 and last.train_state is not None

    rc = zygote.run(train + ["--out", killed, "--epochs", str(epoch + 1)], tmp_path / "rerun.log")
    log = (tmp_path / "rerun.log").read_text()
    assert rc == 0 and f"resuming {ckpt} after epoch {epoch}" in log, log
    rc = zygote.run(train + ["--out", tmp_path / "straight", "--epochs", str(epoch + 1)], tmp_path / "straight.log")
    assert rc == 0, (tmp_path / "straight.log").read_text()
    resumed, straight = load_checkpoint(ckpt), load_checkpoint(tmp_path / "straight" / "detector.pt")
    assert resumed.content_hash == straight.content_hash
    assert resumed.meta["loss_history"] == straight.meta["loss_history"]


def test_reruns_with_another_detector_encoder_setting_or_rule_never_mix(pipeline, encoder, tmp_path, capsys):
    """Rerunning into a finished folder with anything else refused, naming what differs; nothing is touched."""
    from dede_core.detector.encoders import cifar_resnet18, load_encoder
    from flows.cli import main

    def train(name: str, enc, seed: int) -> str:
        return str(train_detector(source=open_source(str(pipeline["corpus"])), data_id="crash", encoder=enc,
                                  config=cpu(**TINY), train=TrainConfig(epochs=1, batch_size=16, holdout=6,
                                                                        knn_bank=20, seed=seed),
                                  out_dir=tmp_path / name))

    torch.manual_seed(7)
    torch.save(cifar_resnet18(width=8).state_dict(), tmp_path / "other_encoder.pt")
    other_encoder = load_encoder(f"cifar-resnet18?width=8&weights={tmp_path / 'other_encoder.pt'}")
    reseeded, retargeted = train("reseeded", encoder, 1), train("retargeted", other_encoder, 0)
    root, shards = pipeline["root"], str(pipeline["shards"])
    scores, clean = root / "scores", root / "clean"
    other_shards = tmp_path / "other_shards"
    shutil.copytree(pipeline["corpus"], tmp_path / "other_corpus", ignore=shutil.ignore_patterns("img_00.png"))
    write_shards(str(tmp_path / "other_corpus"), str(other_shards), samples_per_shard=10, progress=False)
    score = [str(a) for a in pipeline["score"][4:]]  # the options after `score SHARDS --detector D`
    assert main(["score", shards, "--detector", reseeded, "--out", str(tmp_path / "scores_b"), *score]) == 0
    before = snapshot(root)
    refusals = [  # (argv, what the message must name)
        (["score", shards, "--detector", reseeded, "--out", str(scores), *score], ["detector_hash"]),
        (["score", shards, "--detector", retargeted, "--out", str(scores), *score],
         ["detector_hash", "encoder_fingerprint", "encoder_spec"]),
        (["score", shards, "--detector", str(pipeline["detector"]), "--out", str(scores), *score, "--seed", "1"],
         ["score.seed: 0 -> 1"]),
        (["score", str(other_shards), "--detector", str(pipeline["detector"]), "--out", str(scores), *score],
         ["shards: '6 shards"]),
        (["clean", "--allow-weak-detector", shards, "--scores", str(tmp_path / "scores_b"), "--out", str(clean),
          "--quantile", "0.8", "--no-report"], ["detector_hash", "score_setup"]),
        (["clean", "--allow-weak-detector", shards, "--scores", str(scores), "--out", str(clean), "--quantile", "0.5",
          "--no-report"],
         ["rule.value: 0.8 -> 0.5"]),
    ]
    capsys.readouterr()
    for argv, names in refusals:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "other settings" in err, err
        assert all(name in err for name in names), (names, err)
    assert snapshot(root) == before

    run = tmp_path / "train"
    args = ["train", str(pipeline["corpus"]), "--out", str(run), "--epochs", "1", "--batch-size", "16",
            "--workers", "0", "--threads", "1", "--max-images", "20", "--device", "cpu"]
    assert main(args + ["--encoder", encoder.spec]) == 0
    trained = snapshot(run)
    assert main(args + ["--encoder", other_encoder.spec]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "encoder_fingerprint" in err and "encoder_spec" in err, err
    assert snapshot(run) == trained
