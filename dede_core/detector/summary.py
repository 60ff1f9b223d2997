"""A short human summary of a detector checkpoint (`dede info`): what it detects with, its sizes, its training
and its health. The full record stays available as JSON (`checkpoint_record`, `dede info --json`)."""

from __future__ import annotations

from typing import Any

from dede_core.detector.checkpoint import Checkpoint
from dede_core.detector.encoders import parse_spec
from dede_core.detector.health import describe_health
from dede_core.detector.model import DeDe


def checkpoint_record(ckpt: Checkpoint) -> dict[str, Any]:
    """Every field of the checkpoint but its tensors (and the resume identity), JSON-ready."""
    meta = {k: v for k, v in ckpt.meta.items() if k != "identity"}
    spec = parse_spec(ckpt.encoder_spec)
    views = {"encoder": f"decoded at the encoder's own input size ({spec.option('size', 'its natural size')} px, "
                        f"fit {spec.option('fit')}), never through the detector's size",
             "detector": f"reconstructs {ckpt.config.img_size} px (patch {ckpt.config.patch_size}, fit "
                         f"{ckpt.config.fit}) from the same decode"}
    return {"content_hash": ckpt.content_hash, "encoder_spec": ckpt.encoder_spec,
            "encoder_fingerprint": ckpt.encoder_fingerprint, "global_dim": ckpt.global_dim,
            "config": ckpt.config.to_dict(), "views": views, "resumable": ckpt.train_state is not None,
            "meta": meta}


def _data(data_id: str | None) -> str:
    """`PATH|n=N|keys=DIGEST` (dede_core.detector.aux.data_id) as `PATH (N images, keys DIGEST)`."""
    if not data_id:
        return "not recorded"
    path, *rest = data_id.split("|")
    fields = dict(part.partition("=")[::2] for part in rest)
    if set(fields) != {"n", "keys"}:
        return data_id
    return f"{path} ({fields['n']} images, keys {fields['keys']})"


def _training(meta: dict[str, Any], resumable: bool) -> list[tuple[str, str]]:
    epoch = meta.get("epoch")
    if epoch is None:
        return [("epochs", "not recorded")]
    budget = (f"of {meta['epochs']} asked for" if meta.get("epochs")
              else "until the embedding reliance stopped improving")
    rows = [("epochs", f"{epoch} ({budget})")]
    if meta.get("complete") and not resumable:
        rows.append(("stopped", str(meta.get("stopped", "finished"))))
        if meta.get("best_epoch"):
            kept = "its weights are kept" if meta.get("epochs") is None else "the last epoch's weights are kept"
            rows.append(("best epoch", f"{meta['best_epoch']} by embedding reliance ({kept})"))
    else:
        rows.append(("stopped", "not finished: rerun the same dede train command to resume"))
    rows.append(("data", _data(meta.get("identity", {}).get("data"))))
    if "images" in meta:
        rows.append(("images", f"{meta['images']} trained on, {meta.get('held_out', 0)} held out for calibration, "
                               f"{meta.get('undecodable', 0)} undecodable"))
    losses = meta.get("loss_history") or []
    if losses:
        rows.append(("last loss", f"{losses[-1]:.4g}"))
    return rows


def describe_checkpoint(ckpt: Checkpoint, *, path: str = "") -> str:
    """A few lines for people: encoder and fingerprint, detector sizes, training, health, content hash."""
    cfg, spec = ckpt.config, parse_spec(ckpt.encoder_spec)
    params = sum(p.numel() for p in DeDe(config=cfg, global_dim=ckpt.global_dim).parameters())
    size = spec.option("size")
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        ("detects with", [
            ("encoder", ckpt.encoder_spec),
            ("fingerprint", ckpt.encoder_fingerprint),
            ("embedding", f"{ckpt.global_dim}-d, from images decoded at "
                          f"{f'{size} px' if size else 'its natural size'} (fit {spec.option('fit')})"),
        ]),
        ("detector", [
            ("image size", f"{cfg.img_size} px, patch {cfg.patch_size} ({cfg.num_patches} patches), "
                           f"{cfg.in_chans} channels, fit {cfg.fit}"),
            ("width, depth", f"encoder {cfg.embed_dim} x {cfg.depth} blocks, decoder {cfg.decoder_embed_dim} x "
                             f"{cfg.decoder_depth} blocks"),
            ("parameters", f"{params:,}"),
            ("scores with", f"{cfg.score_visible} visible patches (trained with {cfg.train_visible})"),
        ]),
        ("training", _training(ckpt.meta, ckpt.train_state is not None)),
    ]
    width = max(len(label) for _, rows in sections for label, _ in rows)
    lines = [f"detector {path}".rstrip()]
    for title, rows in sections:
        lines.append(f"{title}:")
        lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    lines.append(describe_health(ckpt.meta.get("health")))
    lines.append(f"content hash {ckpt.content_hash}")
    return "\n".join(lines)
