"""The `dede` command line's shared options, and the config objects they make: every flag is defined once."""

from __future__ import annotations

import argparse
import dataclasses

RUNNER_HELP = ("where the shard tasks run: local (threads in this process; default), dask (a Dask cluster "
               "started here: one process per GPU, pinned to it, or --dask-workers CPU processes), or "
               "dask://HOST:PORT (an existing Dask scheduler; its workers need dede and PREFECT_API_URL). "
               "Any runner writes the same bytes")


def device(name: str) -> str:
    """--device: auto -> cuda when present, else cpu; refuses cuda where there is none."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available here")
    return name


WORKERS_HELP = ("decoding processes (default: the cores the model leaves: on the CPU those beyond torch's threads "
                "and at least one on 2+ cores; on CUDA all cores but one; at most 8)")


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
    """The selection rule, shared by `dede clean` and `dede sanitize`: one of --fdr/--fpr/--quantile/--threshold/
    --where."""
    g = p.add_argument_group("selection rule (give at most one; default --fdr 0.05)")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--fdr", type=float, metavar="R",
                     help="the combined verdict (default, R=0.05): the corpus' own neighbourhoods (collapse, when the "
                     "neighbours stage ran) and the distance to the auxiliary images each become a p-value under a "
                     "null fitted to the corpus' bulk, the p-values combine into one per sample, and "
                     "Benjamini-Hochberg at R drops what it flags: about a fraction R of what is dropped is clean, "
                     "and a corpus with no poison loses almost nothing; needs no labels")
    one.add_argument("--fpr", type=float, metavar="F",
                     help="drop samples above the (1-F) quantile of the detector's held-out calibration scores: "
                     "about a fraction F of clean images is dropped, whatever the poison rate")
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
    g.add_argument("--decisions", metavar="FILE",
                   help="a reviewer's keep/drop decisions (RUN/review/decisions.parquet, written by `dede review`), "
                   "applied on top of the rule: keep takes a sample out of the dropped ones, drop adds it")


def rule_from_args(args: argparse.Namespace):
    """The one Rule the add_rule_options flags describe (Rule.fdr(0.05) when none is given)."""
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
    elif args.fpr is not None:
        rule = Rule.fpr(args.fpr, column=column)
    else:
        if args.column is not None:
            raise ValueError("--column does not apply to the combined verdict (--fdr); give --fpr, --quantile or "
                             "--threshold with it")
        rule = Rule.fdr(0.05 if args.fdr is None else args.fdr)
    return dataclasses.replace(rule, allow_weak_detector=args.allow_weak_detector)


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


def add_parquet_options(p: argparse.ArgumentParser) -> None:
    """How a Parquet SRC is read, shared by `dede shard` and `dede sanitize`."""
    g = p.add_argument_group("Parquet sources (one file, a folder of files, or a glob such as 'data/train-*.parquet')")
    g.add_argument("--image-column", default=None,
                   help="column of encoded image bytes, or of {bytes, path} structs (default: image, bytes, jpg, png)")
    g.add_argument("--key-column", default=None,
                   help="column of unique sample keys, e.g. an id (default: <file stem>_<row number>)")
    g.add_argument("--label-column", default=None, help="column of labels, integers or class names "
                   "(default: 'label' if any)")


def add_output_options(p: argparse.ArgumentParser) -> None:
    """What the clean stage writes besides its verdicts, shared by `dede clean` and `dede sanitize`."""
    p.add_argument("--no-copy", action="store_true",
                   help="write the verdicts only (rejected.parquet, summary.json, the report), not the cleaned "
                   "shards: for training loaders that skip what dede dropped (dede keys, docs/api.md)")
    p.add_argument("--thumbnails", type=int, default=24, metavar="N",
                   help="sample thumbnails in the report, half the most flagged, half just below the threshold "
                   "(default 24)")


def score_config(args: argparse.Namespace):
    from dede_core.detector.scorer import ScoreConfig

    return ScoreConfig(seed=args.seed, draws=args.draws, visible=args.visible, chunk=args.chunk,
                       cpu_bf16=getattr(args, "bf16", False), cuda_fp32=getattr(args, "fp32", False))


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
    p.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)


def add_runner_options(p: argparse.ArgumentParser) -> None:
    """--runner and --dask-workers, shared by score, clean and sanitize."""
    g = p.add_argument_group("scale-out (see README, Scaling out)")
    g.add_argument("--runner", default="local", metavar="local|dask|dask://HOST:PORT", help=RUNNER_HELP)
    g.add_argument("--dask-workers", type=int, default=None, metavar="N",
                   help="CPU worker processes of the cluster --runner dask starts (default 2; with GPUs: one "
                   "per GPU)")



def score_settings(args: argparse.Namespace, *, group_size: int | None):
    """The score stage's settings from the score options; group_size shards per job (None: one job)."""
    from dede_core.stages.score import ScoreSettings

    return ScoreSettings(score=score_config(args), knn_k=args.knn_k, with_embedding=args.with_embedding,
                         batch_size=args.batch_size, workers=args.workers, device=device(args.device),
                         encoder=args.encoder, group_size=group_size)


def add_neighbours_options(p: argparse.ArgumentParser) -> None:
    """The neighbours stage's settings (dede_core.stages.neighbours.NeighboursSettings)."""
    g = p.add_argument_group("neighbourhoods")
    g.add_argument("--ks", default="3,5,10,20", help="the k of each kdist_<k> column; the largest is how many "
                   "neighbours are kept (default 3,5,10,20)")
    g.add_argument("--exact-limit", type=int, default=50_000,
                   help="exact search up to this many embeddings, an IVF index beyond (default 50000)")
    g.add_argument("--pca-dim", type=int, default=128, help="IVF: search in the top N directions (0: all; default 128)")
    g.add_argument("--nprobe", type=int, default=None, help="IVF lists searched per query (default: from N)")
    g.add_argument("--memory-mib", type=int, default=4096, help="memory budget of the index and the finish step "
                   "(default 4096)")
    g.add_argument("--dup-threshold", type=float, default=0.95, help="thumbnail correlation from which a neighbour "
                   "is a near-duplicate (default 0.95)")
    g.add_argument("--rows-per-job", type=int, default=200_000, help="samples per task (default 200000)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]: a GPU index when faiss has GPU support "
                   "(default cpu)")


def neighbours_settings(args: argparse.Namespace):
    from dede_core.stages.neighbours import NeighboursSettings

    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        raise ValueError(f"--ks takes comma-separated integers, e.g. 3,5,10,20; got {args.ks!r}") from None
    return NeighboursSettings(ks=ks, exact_limit=args.exact_limit, pca_dim=args.pca_dim or None, nprobe=args.nprobe,
                              memory_mib=args.memory_mib, dup_threshold=args.dup_threshold,
                              rows_per_job=args.rows_per_job, device=device(args.device))


def clean_settings(args: argparse.Namespace):
    """The clean stage's settings from the rule and output options."""
    from dede_core.stages.clean import CleanSettings

    import os

    decisions = None if args.decisions is None else os.path.abspath(args.decisions)
    return CleanSettings(rule=rule_from_args(args), keep_unscored=args.keep_unscored, copy=not args.no_copy,
                         neighbours=getattr(args, "neighbours", None), decisions=decisions)


def engine(args: argparse.Namespace):
    """Where the stages' jobs run: --runner, --dask-workers and (sanitize) --max-parallel."""
    from flows.runners import Engine

    return Engine(runner=args.runner, max_parallel=getattr(args, "max_parallel", 1), dask_workers=args.dask_workers)


def sanitize_config(args: argparse.Namespace):
    """Every stage's settings of `dede sanitize`, as the dede-sanitize flow takes them."""
    from dede_core.detector.train import TrainConfig
    from flows.sanitize import SanitizeConfig
    from flows.shard import ShardSettings
    from flows.train import TrainSettings

    train = TrainConfig(epochs=args.epochs, max_epochs=args.max_epochs, patience=args.patience,
                        batch_size=args.train_batch_size)
    return SanitizeConfig(
        detector=args.detector, aux=args.aux,
        training=TrainSettings(preset=args.preset, overrides=detector_overrides(args), train=train),
        shard=ShardSettings(samples_per_shard=args.samples_per_shard, image_column=args.image_column,
                            key_column=args.key_column, label_column=args.label_column,
                            follow_external_links=args.follow_external_links),
        score=score_settings(args, group_size=args.group_size), clean=clean_settings(args), engine=engine(args),
        thumbnails=args.thumbnails)
