"""The `dede` console script: dede_core's commands plus `dede sanitize`, which runs the dede-sanitize flow.

Prefect is imported only when `sanitize` runs, so every other command (and --help) starts as fast as before.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from dede_core import cli

SANITIZE_HELP = """\
Run the whole pipeline as the Prefect flow dede-sanitize, into one RUN folder:

  RUN/shards/               SRC as WebDataset shards + manifest.json      (as dede shard)
  RUN/detector/detector.pt  the detector, trained on --aux, else on the
                            corpus itself; not made when --detector given (as dede train)
  RUN/scores/               scores, one Parquet file per shard             (as dede score)
  RUN/clean/                cleaned shards, rejected.parquet, summary.json (as dede clean)
  RUN/report.html           histogram, counts, thumbnails of the selection
  RUN/sanitize.json         config, package versions, detector hash, counts, seconds per stage

Rerunning the same command resumes an interrupted run; on a finished run over an unchanged SRC it does no
new work. Over a SRC that changed, a rerun shards only the new and changed images (new shards after the
existing ones), scores them with the same detector and settings, and cleans with the same threshold; removed
and changed images leave the cleaned corpus (reason source_removed / source_changed in rejected.parquet).
It prints what it found (added, changed, removed, unchanged) and did; sanitize.json and the Prefect
artifact dede-sanitize record it. See README, Scheduled and incremental cleaning.
Without PREFECT_API_URL the flow runs on a temporary local Prefect server; with it, it reports
to that server.
"""

RUNNER_HELP = ("where the shard tasks run: local (threads in this process; default), dask (a Dask cluster "
               "started here: one process per GPU, pinned to it, or --dask-workers CPU processes), or "
               "dask://HOST:PORT (an existing Dask scheduler; its workers need dede and PREFECT_API_URL). "
               "Any runner writes the same bytes")


# Prefect starts a temporary server when PREFECT_API_URL is unset and waits this long for it (Prefect's own
# default is 20 s, which a loaded machine misses): our default unless the user set the setting.
STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_DEFAULT_S = 180
STARTUP_FAILED = "ephemeral Prefect API server"  # in Prefect's RuntimeError when the server did not come up


def hold_on_busy_machine() -> None:
    """Give the temporary Prefect server time to start on a busy machine; called before prefect is imported
    (Prefect reads its settings from the environment when it is imported)."""
    os.environ.setdefault(STARTUP_SETTING, str(STARTUP_DEFAULT_S))


def run_flow(command: str, flow: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a flow; when the temporary Prefect server did not start in time, try once more, then fail with a
    message that names the setting. Every stage resumes from its markers, so a second call redoes nothing."""
    for attempt in (1, 2):
        try:
            return flow(*args, **kwargs)
        except RuntimeError as exc:
            if STARTUP_FAILED not in str(exc):
                raise
            if attempt == 2:
                raise ValueError(
                    f"the temporary Prefect server did not start within {os.environ.get(STARTUP_SETTING)} s, "
                    f"twice (the machine is busy?): set {STARTUP_SETTING} higher (e.g. 600), or PREFECT_API_URL "
                    f"to a running server (`prefect server start`), and rerun `dede {command}`") from None
            print(f"dede {command}: the temporary Prefect server did not start within "
                  f"{os.environ.get(STARTUP_SETTING)} s; trying once more", file=sys.stderr)


def add_runner_options(p: argparse.ArgumentParser) -> None:
    """--runner and --dask-workers, shared by score, clean and sanitize."""
    g = p.add_argument_group("scale-out (see README, Scaling out)")
    g.add_argument("--runner", default="local", metavar="local|dask|dask://HOST:PORT", help=RUNNER_HELP)
    g.add_argument("--dask-workers", type=int, default=None, metavar="N",
                   help="CPU worker processes of the cluster --runner dask starts (default 2; with GPUs: one "
                   "per GPU)")


def add_sanitize(sub) -> None:
    p = sub.add_parser("sanitize", help="shard, train, score, clean and report in one go (Prefect flow)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=SANITIZE_HELP,
                       epilog=cli.EPILOG)
    p.add_argument("src", help="corpus: image folder, .tar shard(s), or a .parquet file of image bytes")
    p.add_argument("--encoder", required=True, help="victim encoder spec: the encoder trained on this corpus")
    p.add_argument("--out", required=True, help="run folder RUN to write (or to resume)")
    p.add_argument("--detector", help="use this detector checkpoint instead of training one")
    p.add_argument("--aux", help="clean auxiliary images to train the detector on (default: the corpus itself)")
    p.add_argument("--preset", choices=["cpu", "paper"], default="cpu", help="detector size (default cpu)")
    cli.add_epoch_options(p)
    p.add_argument("--train-batch-size", type=int, default=64, help="images per optimiser step (default 64)")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="default 10000")
    p.add_argument("--group-size", type=int, default=1, help="shards per scoring task (default 1)")
    p.add_argument("--max-parallel", type=int, default=1, help="scoring tasks at a time (default 1)")
    cli.add_follow_links_option(p)
    add_runner_options(p)
    cli.add_detector_options(p)
    cli.add_rule_options(p)
    g = p.add_argument_group("scoring")
    cli.add_score_options(g)
    p.set_defaults(func=cmd_sanitize)


def cmd_sanitize(args: argparse.Namespace) -> int:
    from flows.sanitize import sanitize_flow
    from flows.score import ShardsFailed

    cli.check_local_out(args.out, "sanitize")
    rule = cli.rule_from_args(args)
    try:
        result = run_flow(
            "sanitize", sanitize_flow, args.src, args.encoder, args.out, detector=args.detector, aux=args.aux,
            preset=args.preset, detector_overrides=cli.detector_overrides(args), epochs=args.epochs,
            max_epochs=args.max_epochs, patience=args.patience,
            train_batch_size=args.train_batch_size, samples_per_shard=args.samples_per_shard, rule=rule.to_dict(),
            keep_unscored=args.keep_unscored, seed=args.seed, draws=args.draws, visible=args.visible,
            chunk=args.chunk, knn_k=args.knn_k, with_embedding=args.with_embedding, batch_size=args.batch_size,
            device=cli._device(args.device), workers=args.workers, group_size=args.group_size,
            max_parallel=args.max_parallel, runner=args.runner, dask_workers=args.dask_workers,
            follow_external_links=args.follow_external_links)
    except ShardsFailed as exc:
        print(f"dede sanitize: {exc}", file=sys.stderr)
        return 1
    from dede_core.stages.record import work_text

    print(f"this run: {work_text(result['work'])}")
    clean = result["counts"]["clean"]
    print(f"kept {clean['kept']} of {clean['total']} samples, dropped {clean['dropped']}; {result['how']}")
    for name in ("clean", "rejected", "report", "manifest"):
        print(f"{name:9s} {result['paths'][name]}")
    return 0


def add_runners(sub) -> None:
    """`dede score` and `dede clean` take --runner: local keeps the plain library call, dask runs the flow."""
    for name, func in (("score", cmd_score), ("clean", cmd_clean)):
        p = sub.choices[name]
        add_runner_options(p)
        p.set_defaults(func=func, local_func=p.get_default("func"))


def cmd_score(args: argparse.Namespace) -> int:
    from flows.runners import parse_runner
    from flows.score import ShardsFailed, score_flow

    if parse_runner(args.runner, workers=args.dask_workers).kind == "local":
        return args.local_func(args)
    if args.only:
        raise ValueError("--only applies to --runner local; a Dask run scores every pending shard")
    try:
        summary = run_flow("score", score_flow, args.shards, args.detector, args.out, seed=args.seed,
                           draws=args.draws, visible=args.visible, chunk=args.chunk, knn_k=args.knn_k,
                           with_embedding=args.with_embedding, batch_size=args.batch_size, workers=args.workers,
                           device=cli._device(args.device), encoder=args.encoder, runner=args.runner,
                           dask_workers=args.dask_workers, cpu_bf16=args.bf16)
    except ShardsFailed as exc:
        print(f"dede score: {exc}", file=sys.stderr)
        return 1
    print(f"scored {len(summary['scored'])} shards ({summary['samples']} samples) on "
          f"{len(set(summary['workers'].values()))} worker processes; {len(summary['skipped'])} already done")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from flows.clean import clean_flow
    from flows.runners import parse_runner

    if parse_runner(args.runner, workers=args.dask_workers).kind == "local":
        return args.local_func(args)
    result = run_flow("clean", clean_flow, args.shards, args.scores, args.out,
                      rule=cli.rule_from_args(args).to_dict(), keep_unscored=args.keep_unscored,
                      report=not args.no_report, runner=args.runner, dask_workers=args.dask_workers)
    c = result["counts"]
    print(f"kept {c['kept']} of {c['total']} samples, dropped {c['dropped']}; {result['how']}")
    print(f"cleaned shards -> {result['out']}  (rejected: {result['rejected']})")
    if result["report"]:
        print(f"report -> {result['report']}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="sanitize a real poisoned corpus end to end (no server, local files)",
                       description="Builds (once, cached) a SimCLR encoder on Fashion-MNIST and backdoors it with "
                       "the BadEncoder white-square trigger, writes a corpus of Fashion-MNIST test images with 2%% "
                       "of them triggered, runs the dede-sanitize flow on it, then prints where the cleaned "
                       "shards, scores and report are, an example `dede sql` query, and the precision and recall "
                       "of the removed samples against the planted ones. Rerunning reuses everything.")
    p.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    p.add_argument("--cache", default="cache", help="where the encoders are cached (default cache)")
    p.add_argument("--corpus-size", type=int, default=5000, help="Fashion-MNIST test images (default 5000)")
    p.add_argument("--poison-rate", type=float, default=0.02, help="fraction triggered (default 0.02)")
    p.add_argument("--epochs", type=int, default=None,
                   help="detector training epochs (default: until the held-out embedding reliance stops improving)")
    p.add_argument("--max-epochs", type=int, default=25,
                   help="cap on the detector's epochs when --epochs is not given (default 25: the demo's time budget)")
    p.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from bench.demo import run_demo

    run_flow("demo", run_demo, args.out, args.cache, corpus_size=args.corpus_size, poison_rate=args.poison_rate,
             epochs=args.epochs, max_epochs=args.max_epochs, workers=args.workers)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser(extra_commands=(add_sanitize, add_demo, add_runners))
    parser.epilog = ("The whole pipeline in one command: dede sanitize SRC --encoder SPEC --out RUN. "
                     + cli.EPILOG)
    return parser


def main(argv: list[str] | None = None) -> int:
    hold_on_busy_machine()
    return cli.main(argv, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
