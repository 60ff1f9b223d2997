"""The `dede` parser: one function per command, the shared flags from flows.cli.options."""

from __future__ import annotations

import argparse

from flows.cli import commands
from flows.cli.options import (add_detector_options, add_epoch_options, add_follow_links_option, add_output_options,
                               add_neighbours_options, add_parquet_options, add_rule_options, add_runner_options, add_score_options,
                               WORKERS_HELP)

CLEAN_HELP = """\
Write the cleaned corpus: every shard of SHARDS again, minus the samples the rule drops. Kept samples are
copied byte for byte (never decoded); samples without a score (decode_error / read_error) are dropped unless
--keep-unscored. Reads SHARDS and SCORES only.

Writes into OUT (rerunning the same command resumes or does nothing; another rule into the same OUT is
refused):
  OUT/<shard>.tar        the kept samples of each shard
  OUT/rejected.parquet   one row per dropped sample: key, shard, source, score, reason
  OUT/summary.json       counts, the rule, the threshold and how it was chosen
  OUT/manifest.json      the cleaned shards, in the shards folder format (written last)
  OUT/report.html        histogram, counts (dropped per label) and thumbnails of the most-flagged samples,
                         linked to their full-size images in OUT/report_images/ (unless --no-report)

--no-copy writes the verdicts without the cleaned shards (no .tar, no manifest.json): `dede keys OUT` lists
the kept samples, and training code can skip the dropped ones while loading (docs/api.md).

The default rule is --fdr 0.05, the combined verdict: every signal (DeDe's score, its raw error, the distance to
the auxiliary images, and the corpus' own neighbourhoods from NEIGHBOURS, by default the neighbours folder beside
SCORES) becomes a p-value under a null fitted to the corpus' bulk; the collapse of the neighbourhoods and the
distance to the auxiliary images combine into one per sample (weighted Cauchy combination, valid when the
signals are dependent) and Benjamini-Hochberg at 0.05 drops what it flags; the others are shown.
OUT/verdict.parquet keeps every sample's p-values; the summary says what each signal found, how many samples
the cut flags and its expected precision. Chosen without labels; --fpr F is the older fixed-share rule.
"""

SQL_HELP = """\
Run one read-only SQL statement (DuckDB dialect) over a scores folder and print the result as a table, or
write it whole with --out. The connection can read only these views' files: COPY, ATTACH, INSTALL and
any statement that writes are refused.

Views:
  scores       every SCORES/<shard>.parquet: key, shard, position, source, label, width, height, status (ok |
               decode_error | read_error | skipped), error, score, draws, knn_score, detector_hash,
               encoder_id [, embedding]; status skipped: source entries dede shard left out (shard '')
  calibration  SCORES/calibration.parquet: key, score, knn_score of held-out auxiliary images
  rejected     with --rejected CLEAN: key, shard, source, score, reason of every dropped sample
  verdict      with --rejected CLEAN of an --fdr run: key, shard, p_<signal> per signal, p_combined, q_value,
               verdict (what the combined verdict flagged)
  neighbours   when the neighbours folder beside SCORES is finished: key, shard, kdist_3/5/10/20, lid, slof,
               dao, kdist_distinct, dup_count, collapse, group_id, group_size (join on shard, key)
  manifest     with --shards SHARDS: name, samples, bytes, blake3 (sha256 before #22), first_key, last_key per shard

Examples:
  dede sql scores "SELECT status, count(*) FROM scores GROUP BY status"
  dede sql scores "SELECT key, score FROM scores ORDER BY score DESC LIMIT 20" --out top.csv
  dede sql scores "SELECT reason, count(*) FROM rejected GROUP BY ALL" --rejected clean
  dede sql scores "SELECT key, score FROM scores ORDER BY score DESC LIMIT 40" --html top.html
  dede sql scores "SELECT key FROM scores WHERE label = 3 AND score > 900" --export-images look/

--html and --export-images look each result row up by its `key` (so select it): the page shows its thumbnail
(linked to the full-size image, in <page>_images/), score, label, source reference and the result's columns;
the folder gets the images, numbered in result order. Images are read from --shards, by default the `shards`
folder beside SCORES (a dede sanitize run).
"""

NEIGHBOURS_HELP = """\
Every sample's neighbourhood within the corpus, from the victim embeddings the score stage keeps
(SCORES/embeddings/). Triggered samples' embeddings collapse onto one point, so they are each other's nearest
neighbours: small k-distances, low local dimension, one tight group. A clean near-duplicate group (one image
re-encoded or resized) is tight too, but its thumbnails correlate: kdist_distinct skips such neighbours.

Writes into OUT (rerunning does nothing on an unchanged SCORES; on a grown one the index and every sample's
neighbourhood are recomputed, the embeddings never; other settings into the same OUT are refused):
  OUT/<shard>.parquet  key, shard, position, row, kdist_3/5/10/20, lid, slof, dao, kdist_distinct, dup_count,
                       group_id, group_size (schemas/README.md)
  OUT/summary.json     N, the index, tau, the number and sizes of tight groups, timings
  OUT/index.faiss      the index (exact up to --exact-limit embeddings, else IVF after a projection to
                       --pca-dim dims, its candidates re-ranked by the exact cosine)

Memory: the index (IVF: N x pca-dim x 4 bytes, or 8-bit codes when over --memory-mib) and finish's
N x k_max x 13 bytes of neighbour lists; a corpus beyond --memory-mib is refused.
Query it with DuckDB, e.g.
  SELECT key, kdist_distinct, group_size FROM 'OUT/*.parquet' ORDER BY kdist_distinct LIMIT 20
"""

EPILOG = "Encoder specs: see docs/encoders.md (e.g. cifar-resnet18?width=16&weights=enc.pt, efficientnet-lite0)."


SANITIZE_HELP = """\
Run the whole pipeline as the Prefect flow dede-sanitize, into one RUN folder:

  RUN/shards/               SRC as WebDataset shards + manifest.json      (as dede shard)
  RUN/detector/detector.pt  the detector, trained on --aux, else on the
                            corpus itself; not made when --detector given (as dede train)
  RUN/scores/               scores, one Parquet file per shard             (as dede score)
  RUN/clean/                cleaned shards, rejected.parquet, summary.json (as dede clean;
                            --no-copy: the verdicts only, no cleaned shards)
  RUN/report.html           histogram, counts, thumbnails of the selection (+ RUN/report_images/)
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


def _add_shard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="pack a corpus into WebDataset shards with a manifest",
                       description="SRC: an image folder (a subfolder name is the class label), WebDataset "
                       "shards, or Parquet with an image-bytes column (a file, a folder of files, or a glob such "
                       "as 'data/train-*.parquet'). Writes OUT/000000.tar, ... with "
                       "the original bytes under stable keys, and OUT/manifest.json. Rerunning brings OUT up to date "
                       "with SRC: new and changed samples go into new shards after the existing ones (which "
                       "stay byte-identical), removed and changed ones are listed as retired in the manifest "
                       "(dede clean then drops them); an unchanged SRC is not read again (size and mtime "
                       "checked) and nothing is written.")
    p.add_argument("src", help="image folder, .tar shard(s), or Parquet: a file, a folder or a glob (local path or "
                   "fsspec URL)")
    p.add_argument("--out", required=True, help="shards folder to write")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="default 10000")
    add_parquet_options(p)
    add_follow_links_option(p)
    p.set_defaults(func=commands.cmd_shard)


def _add_train(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=commands.cmd_train)


def _add_score(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU too (CUDA uses it unless --fp32): about "
                   "1.6x faster on CPUs with AMX, scores close to but not equal to fp32 (docs/results/throughput.md)")
    p.add_argument("--fp32", action="store_true", help="on CUDA, fp32 instead of bf16 autocast: slower, scores closer "
                   "to the CPU's (a scores folder still holds one device type)")
    add_runner_options(p)
    p.set_defaults(func=commands.cmd_score)


def _add_neighbours(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neighbours", help="each sample's corpus-level embedding neighbourhood (k-distances, LID, "
                       "tight groups)", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=NEIGHBOURS_HELP)
    p.add_argument("scores", help="scores folder written by `dede score` (with its embeddings/ folder)")
    p.add_argument("--out", required=True, help="neighbours folder to write")
    add_neighbours_options(p)
    add_runner_options(p)
    p.set_defaults(func=commands.cmd_neighbours)


def _add_clean(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clean", help="write the cleaned corpus: the shards minus the samples one rule drops",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=CLEAN_HELP)
    p.add_argument("shards", help="shards folder written by `dede shard` (read only)")
    p.add_argument("--scores", required=True, help="scores folder written by `dede score` for these shards")
    p.add_argument("--out", required=True, help="new (or empty) folder for the cleaned shards")
    p.add_argument("--neighbours", default=None,
                   help="the neighbours folder of these scores (`dede neighbours`), whose corpus-level signals join "
                   "the --fdr verdict (default: the neighbours folder beside SCORES, when it is finished)")
    add_rule_options(p)
    p.add_argument("--no-report", action="store_true", help="do not write OUT/report.html")
    add_output_options(p)
    add_runner_options(p)
    p.set_defaults(func=commands.cmd_clean)


def _add_sql(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sql", help="run one read-only SQL query over a scores folder (DuckDB)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=SQL_HELP)
    p.add_argument("scores", help="scores folder written by `dede score`")
    p.add_argument("query", help='one SELECT statement, e.g. "SELECT * FROM scores ORDER BY score DESC LIMIT 10"')
    p.add_argument("--out", help="write the whole result to this .csv or .parquet file instead of printing it")
    p.add_argument("--rejected", help="a clean folder (or its rejected.parquet): adds the view `rejected`")
    p.add_argument("--shards", help="a shards folder (or its manifest.json): adds the view `manifest`, and is where "
                   "--html and --export-images read images (default: the shards folder beside SCORES)")
    p.add_argument("--max-rows", type=int, default=50,
                   help="rows printed, shown by --html or exported (default 50; --out writes them all)")
    p.add_argument("--html", metavar="PAGE.html", help="also write the result rows as a page of thumbnails")
    p.add_argument("--export-images", metavar="DIR", help="also write the result rows' images to DIR")
    p.set_defaults(func=commands.cmd_sql)


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="list the samples a clean run kept (or dropped), with their source references",
                       description="The kept samples of RUN (a dede sanitize run folder, or a dede clean folder, "
                       "also one written with --no-copy): the scores table less rejected.parquet, exactly the "
                       "samples of the cleaned shards. Printed as `key<TAB>source` lines, or written with --out "
                       "(.txt: the same lines; .parquet: key, shard, source, label, score). RUN may be an fsspec "
                       "URL. Python: dede_core.Verdicts (docs/api.md).")
    p.add_argument("run", help="dede sanitize run folder or dede clean output folder")
    p.add_argument("--rejected", action="store_true", help="the dropped samples instead (with score and reason)")
    p.add_argument("--out", metavar="FILE.txt|FILE.parquet", help="write them to this file instead of printing")
    p.set_defaults(func=commands.cmd_keys)


def _add_review(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="a local web app to look at what a run flagged and decide keep/drop",
                       description="Serve a page over a finished RUN (scored, cleaned or not): the run's summary, "
                       "the flagged groups as thumbnail grids, the flagged samples (sortable, filterable), a map "
                       "of the embeddings, a read-only query box (the views of dede sql). Marking a sample or a "
                       "group keep/drop saves RUN/review/decisions.parquet; `dede clean ... --decisions FILE` "
                       "applies it. Binds 127.0.0.1 and prints a URL with a random token that every request needs "
                       "(docs/reviewing.md).")
    p.add_argument("run", help="dede sanitize RUN folder (holds shards/ and scores/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only); the token still guards every request")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.set_defaults(func=commands.cmd_review)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="summarise a detector checkpoint: encoder, sizes, training, health")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true",
                   help="print every recorded field as JSON instead (config, loss and reliance histories, ...)")
    p.set_defaults(func=commands.cmd_info)


def _add_sanitize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sanitize", help="shard, train, score, clean and report in one go (Prefect flow)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=SANITIZE_HELP,
                       epilog=EPILOG)
    p.add_argument("src", help="corpus: image folder, .tar shard(s), or Parquet of image bytes (a file, a folder "
                   "of files, or a glob such as 'data/train-*.parquet')")
    p.add_argument("--encoder", required=True, help="victim encoder spec: the encoder trained on this corpus")
    p.add_argument("--out", required=True, help="run folder RUN to write (or to resume)")
    p.add_argument("--detector", help="use this detector checkpoint instead of training one")
    p.add_argument("--aux", help="clean auxiliary images to train the detector on (default: the corpus itself)")
    p.add_argument("--preset", choices=["cpu", "paper"], default="cpu", help="detector size (default cpu)")
    add_epoch_options(p)
    p.add_argument("--train-batch-size", type=int, default=64, help="images per optimiser step (default 64)")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="default 10000")
    p.add_argument("--group-size", type=int, default=1, help="shards per scoring task (default 1)")
    p.add_argument("--max-parallel", type=int, default=1, help="scoring tasks at a time (default 1)")
    add_follow_links_option(p)
    add_parquet_options(p)
    add_runner_options(p)
    add_detector_options(p)
    add_rule_options(p)
    add_output_options(p)
    g = p.add_argument_group("scoring")
    add_score_options(g)
    p.set_defaults(func=commands.cmd_sanitize)


COMMANDS = (_add_sanitize, _add_shard, _add_train, _add_score, _add_neighbours, _add_clean, _add_keys, _add_sql,
            _add_review, _add_info)


def build_parser() -> argparse.ArgumentParser:
    """The `dede` parser; `bench`, `demo` and `data` join it when the bench extra is installed."""
    parser = argparse.ArgumentParser(
        prog="dede", description="Find and remove backdoor-trigger samples in image corpora with the DeDe detector.",
        epilog="The whole pipeline in one command: dede sanitize SRC --encoder SPEC --out RUN. " + EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    try:
        from bench import cli as bench_cli
    except ImportError:  # the product installed without the research package
        return parser
    if bench_cli.available():
        bench_cli.register(sub)
    return parser
