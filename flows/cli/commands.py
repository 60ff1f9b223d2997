"""The `dede` commands: each parses nothing and calls one library function (or, for a Dask runner or the whole
pipeline, one flow). Results go to stdout; progress and warnings go to the `dede` logger (stderr)."""

from __future__ import annotations

import argparse
import json
import logging
import os

from flows.cli import options
from flows.cli.startup import run_flow

log = logging.getLogger("dede")


def cmd_shard(args: argparse.Namespace) -> int:
    from dede_core.stages.shard import update_shards

    options.check_local_out(args.out, "shard", allow_url=True)
    update = update_shards(args.src, args.out, samples_per_shard=args.samples_per_shard,
                           image_column=args.image_column, key_column=args.key_column,
                           label_column=args.label_column, follow_external_links=args.follow_external_links)
    manifest = update.manifest
    print(f"{manifest.samples} samples in {len(manifest.shards)} shards -> {args.out} "
          f"(this run: {update.changes.text()})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    options.check_local_out(args.out, "train")
    import torch

    from dede_core.detector.encoders import load_encoder
    from dede_core.detector.aux import data_id, detector_config
    from dede_core.detector.train import TrainConfig, train_detector
    from dede_core.io.sources import open_source

    torch.set_num_threads(args.threads or torch.get_num_threads())
    train = TrainConfig(epochs=args.epochs, max_epochs=args.max_epochs, patience=args.patience,
                        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                        max_images=args.max_images)
    device = options.device(args.device)
    source = open_source(args.data)
    encoder = load_encoder(args.encoder)
    config, size_note = detector_config(args.preset, options.detector_overrides(args), source)
    keys = source.keys()[: args.max_images] if args.max_images else source.keys()
    budget = (f"{train.epochs} epochs" if train.epochs else f"until the held-out embedding reliance stops "
              f"improving (patience {train.patience}, at most {train.max_epochs} epochs)")
    log.info("training the %s detector for %s (D=%d, sees %s px) on %d images from %s; %s; %s; device %s",
             args.preset, encoder.spec, encoder.dim, encoder.input_size, len(keys), args.data, size_note, budget,
             device)
    try:
        path = train_detector(source=source, data_id=data_id(args.data, keys), encoder=encoder, config=config,
                              train=train, out_dir=args.out, device=device, workers=args.workers)
    except KeyboardInterrupt:
        log.error("\ninterrupted: rerun the same command to resume from the last saved epoch in %s", args.out)
        return 130
    print(path)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """--runner local: the stage's steps in this process (one job); otherwise the dede-score flow."""
    options.check_local_out(args.out, "score", allow_url=True)
    engine = options.engine(args)
    if engine.parse().kind == "local":
        from dede_core.stages.protocol import run_in_order
        from dede_core.stages.score import SCORE, ScoreRun

        run = ScoreRun(args.shards, args.detector, args.out, options.score_settings(args, group_size=None),
                       only=args.only or None)
        result = run_in_order(SCORE, run)
        if result.failed:
            log.error("%d shards could not be read: %s; see %s/_failed/", len(result.failed),
                      sorted(result.failed), args.out)
            return 1
        return 0
    if args.only:
        raise ValueError("--only applies to --runner local; a Dask run scores every pending shard")
    from flows.score import ShardsFailed, score_flow

    try:
        summary = run_flow("score", score_flow, args.shards, args.detector, args.out,
                           options.score_settings(args, group_size=1), engine)
    except ShardsFailed as exc:
        log.error("dede score: %s", exc)
        return 1
    print(f"scored {len(summary['scored'])} shards ({summary['samples']} samples) on "
          f"{len(set(summary['workers'].values()))} worker processes; {len(summary['skipped'])} already done")
    return 0


def cmd_neighbours(args: argparse.Namespace) -> int:
    """--runner local: the stage's steps in this process; otherwise the dede-neighbours flow."""
    options.check_local_out(args.out, "neighbours", allow_url=True)
    settings, engine = options.neighbours_settings(args), options.engine(args)
    if engine.parse().kind == "local":
        from dede_core.stages.neighbours import neighbours

        result = neighbours(args.scores, args.out, settings)
        summary, recomputed = result.summary, result.recomputed
    else:
        from flows.neighbours import neighbours_flow

        summary = run_flow("neighbours", neighbours_flow, args.scores, args.out, settings, engine)
        recomputed = summary["recomputed"]
    index = summary["index"]
    print(f"{summary['embeddings']} samples, {index['kind']} index; tau {summary['tau']:.4g}: {summary['groups']} "
          f"tight groups ({summary['grouped_samples']} samples){'' if recomputed else ' (already complete)'} "
          f"-> {args.out}")
    return 0


def _what(args: argparse.Namespace) -> str:
    return "verdicts only (--no-copy; list them with dede keys)" if args.no_copy else "cleaned shards"


def cmd_clean(args: argparse.Namespace) -> int:
    """--runner local: the stage's steps in this process; otherwise the dede-clean flow."""
    options.check_local_out(args.out, "clean", allow_url=True)
    settings, engine = options.clean_settings(args), options.engine(args)
    if engine.parse().kind == "local":
        from dede_core.detector.health import describe_health
        from dede_core.stages.clean import CLEAN, CleanRun
        from dede_core.stages.protocol import run_in_order
        from dede_core.stages.report import write_report
        from schemas.names import REPORT

        result = run_in_order(CLEAN, CleanRun(args.shards, args.scores, args.out, settings))
        c, sel = result.counts, result.selection
        fate = "kept" if args.keep_unscored else "dropped"
        print(f"kept {c.kept} of {c.total} samples, dropped {c.dropped} ({c.unscored} without a score, {fate})")
        print(f"rule {settings.rule.label}: {sel.how}")
        print(describe_health(sel.detector_health))
        print(f"{_what(args)} -> {result.out_dir}  (rejected: {result.rejected_path})")
        if not args.no_report:
            path = write_report(args.scores, args.shards, os.path.join(result.out_dir, REPORT), selection=sel,
                                n_thumbs=args.thumbnails)
            print(f"report -> {path}")
        return 0
    from flows.clean import clean_flow

    result = run_flow("clean", clean_flow, args.shards, args.scores, args.out, settings, engine,
                      report=not args.no_report, thumbnails=args.thumbnails)
    c = result["counts"]
    print(f"kept {c['kept']} of {c['total']} samples, dropped {c['dropped']}; {result['how']}")
    print(f"{_what(args)} -> {result['out']}  (rejected: {result['rejected']})")
    if result["report"]:
        print(f"report -> {result['report']}")
    return 0


def cmd_sanitize(args: argparse.Namespace) -> int:
    from dede_core.stages.record import work_text
    from flows.sanitize import sanitize_flow
    from flows.score import ShardsFailed

    options.check_local_out(args.out, "sanitize")
    try:
        result = run_flow("sanitize", sanitize_flow, args.src, args.encoder, args.out, options.sanitize_config(args))
    except ShardsFailed as exc:
        log.error("dede sanitize: %s", exc)
        return 1
    print(f"this run: {work_text(result['work'])}")
    clean = result["counts"]["clean"]
    print(f"kept {clean['kept']} of {clean['total']} samples, dropped {clean['dropped']}; {result['how']}")
    for name in ("clean", "rejected", "report", "manifest"):
        print(f"{name:9s} {result['paths'][name]}")
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
    elif not (args.html or args.export_images):
        print(format_table(table, max_rows=args.max_rows))
    if args.html or args.export_images:
        from dede_core.sql_page import inspect_result

        written = inspect_result(table, args.scores, query=args.query, shards_dir=args.shards, html_out=args.html,
                                 export_dir=args.export_images, max_rows=args.max_rows)
        if args.html:
            print(f"page -> {written.pop(0)}")
        if args.export_images:
            print(f"{len(written)} images -> {args.export_images}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from dede_core.verdicts import Verdicts, write_keys

    written = write_keys(Verdicts(args.run).table(rejected=args.rejected), args.out)
    print(f"-> {written}" if args.out else written, end="\n" if args.out else "")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    """Serve the review app until Ctrl-C; prints its URL (with the token every request needs)."""
    from dede_core.review import server

    srv, url = server(args.run, host=args.host, port=args.port)
    print(f"dede review of {os.path.abspath(args.run)}: open {url}", flush=True)
    print("decisions are saved in RUN/review/decisions.parquet; apply them with "
          "`dede clean ... --decisions RUN/review/decisions.parquet`; Ctrl-C stops", flush=True)
    srv.run()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from dede_core.detector.checkpoint import load_checkpoint
    from dede_core.detector.summary import checkpoint_record, describe_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    if args.json:  # every field, the loss and reliance histories included
        print(json.dumps(checkpoint_record(ckpt), indent=2))
    else:
        print(describe_checkpoint(ckpt, path=args.checkpoint))
    return 0
