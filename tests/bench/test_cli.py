"""The research commands (bench.cli): registered on any `dede`-style parser, parsed, and run small."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from PIL import Image

from bench import cli
from bench.datasets import FASHION_MNIST_ROOT


def parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(prog="dede")
    sub = p.add_subparsers(dest="command", required=True)
    return p, cli.register(sub)


def run(argv: list[str]) -> int:
    args = parser()[0].parse_args(argv)
    return args.func(args)


def test_register_adds_the_three_commands_with_their_handlers():
    p, handlers = parser()
    assert handlers == {"data": cli.cmd_data, "bench": cli.cmd_bench, "demo": cli.cmd_demo}
    args = p.parse_args(["bench", "detection", "--tiny", "--attacks", "badencoder,blend", "--cache", "c"])
    assert args.func is cli.cmd_bench and args.tiny and args.attacks == "badencoder,blend" and args.cache == "c"
    assert args.suite == "attacks" and args.out == "docs/results"
    args = p.parse_args(["demo", "--corpus-size", "100"])
    assert args.func is cli.cmd_demo and args.corpus_size == 100 and args.max_epochs == 25 and args.epochs is None
    args = p.parse_args(["data", "mnist", "--out", "x"])
    assert args.func is cli.cmd_data and args.split == "train" and args.pad == 32
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "speed"])


def test_help_texts_print_percent_signs_once(capsys):
    with pytest.raises(SystemExit):
        parser()[0].parse_args(["bench", "--help"])
    out = capsys.readouterr().out
    assert "TPR at 1% and 5% FPR" in out and "%%" not in out


def test_available_follows_the_bench_extra(monkeypatch):
    assert cli.available()  # the test extra installs the bench extra
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "sklearn" else real(name))
    assert not cli.available()


def test_unknown_attacks_and_cases_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown attack\(s\) \['nope'\]"):
        run(["bench", "detection", "--tiny", "--attacks", "badencoder,nope", "--cache", str(tmp_path)])
    with pytest.raises(ValueError, match=r"unknown case\(s\) \['nope'\]"):
        run(["bench", "detection", "--suite", "generalization", "--tiny", "--cases", "nope",
             "--cache", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before anything is computed


def test_tiny_detection_bench_writes_its_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["bench", "detection", "--tiny", "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    assert f"wrote {out}/detection-tiny.md" in capsys.readouterr().out
    report = json.loads((out / "detection-tiny.json").read_text())
    assert report["finished"] and [r["attack"] for r in report["results"]] == ["badencoder"]
    assert "knn_distance" in report["results"][0]["rows"]


@pytest.mark.skipif(not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz")),
                    reason="Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed")
def test_data_writes_fashion_mnist_as_class_folders(tmp_path, capsys):
    out = tmp_path / "fashion"
    assert run(["data", "fashion-mnist", "--split", "test", "--limit", "12", "--out", str(out)]) == 0
    pngs = sorted(out.glob("*/*.png"))
    assert len(pngs) == 12 and {p.parent.name for p in pngs} <= {"T-shirt_top", "Trouser", "Pullover", "Dress",
                                                                 "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                                                                 "Ankle boot"}
    assert Image.open(pngs[0]).size == (32, 32)  # centre-padded from 28 by default
    assert "wrote 12 PNGs of fashion-mnist (test)" in capsys.readouterr().out


def test_data_writes_mnist_digits_unpadded_and_refuses_urls(tmp_path):
    assert run(["data", "mnist", "--limit", "5", "--pad", "0", "--out", str(tmp_path / "digits")]) == 0
    pngs = list((tmp_path / "digits").glob("*/*.png"))
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (28, 28)
    with pytest.raises(ValueError, match="local files only"):
        run(["data", "mnist", "--out", "s3://bucket/digits"])
