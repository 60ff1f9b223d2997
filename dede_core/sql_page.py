"""`dede sql ... --html PAGE` and `--export-images DIR`: the samples of a query result, seen.

Each result row with a `key` is looked up in the scores (shard, score, label, source reference) and its image
in the shards. The page shows a thumbnail per row (linked to the full-size image, written in
`<page>_images/`), then the row's columns; DIR gets the images themselves, numbered in result order, for any
image viewer.
"""

from __future__ import annotations

import html
import os
from typing import Any

import pyarrow as pa

from dede_core.io import storage
from dede_core.sql import connect
from dede_core.stages.report import PAGE_CSS, image_links, linked_thumbnail, read_images, write_images
from dede_core.stages.select import format_number
from schemas import names
from schemas.manifest import manifest_path, read_manifest
from schemas.tables import STATUS_SKIPPED

LOOKED_UP = ("shard", "score", "label", "source")  # from the scores table, next to the result's own columns


def shards_for(scores_dir: str, shards_dir: str | None) -> str:
    """The shards folder holding the images: the one given, else SCORES/../shards (a `dede sanitize` run)."""
    if shards_dir is not None:
        return shards_dir
    beside = storage.join(os.path.dirname(storage.absolute(scores_dir).rstrip("/")), names.SHARDS_DIR)
    if storage.isfile(manifest_path(beside)):
        return beside
    raise ValueError(f"no shards folder beside {scores_dir} to read the images from; pass --shards SHARDS")


def result_samples(table: pa.Table, scores_dir: str, shards_dir: str, limit: int) -> list[dict[str, Any]]:
    """The first `limit` result rows as dicts, each with the scores' shard, score, label, source and its image
    bytes under `image` (None when not found). The result must hold a `key` column."""
    if "key" not in table.column_names:
        raise ValueError(f"the result has no `key` column (columns: {table.column_names}); select it, e.g. "
                         f"SELECT key, score FROM scores ORDER BY score DESC LIMIT 20")
    rows = table.slice(0, limit).to_pylist()
    conn = connect(scores_dir)
    try:
        conn.register("result_keys", pa.table({"key": [str(r["key"]) for r in rows]}))
        found = conn.execute(
            f"SELECT key, {', '.join(LOOKED_UP)} FROM scores WHERE status <> '{STATUS_SKIPPED}' "
            f"AND key IN (SELECT key FROM result_keys) ORDER BY shard DESC").fetchall()
    finally:
        conn.close()
    by_key = {key: dict(zip(LOOKED_UP, values)) for key, *values in found}  # the latest shard's row wins
    wanted: dict[str, set[str]] = {}
    for key, info in by_key.items():
        wanted.setdefault(info["shard"], set()).add(key)
    images = read_images(shards_dir, wanted)
    return [{**by_key.get(str(r["key"]), dict.fromkeys(LOOKED_UP)), **r, "image": images.get(str(r["key"]))}
            for r in rows]


def export_images(samples: list[dict[str, Any]], folder: str) -> list[str]:
    """Write the images of `samples` (result_samples) to FOLDER, numbered in result order; returns their paths."""
    files = write_images([(str(s["key"]), s["image"]) for s in samples if s["image"] is not None], folder)
    return [storage.join(folder, n) for n in files]


def _text(value: Any) -> str:
    if value is None:
        return "NULL"
    return format_number(value) if isinstance(value, float) else str(value)


def write_query_page(samples: list[dict[str, Any]], columns: list[str], out_html: str, *, query: str,
                     total: int, classes: list[str] | None = None) -> str:
    """One HTML page: per sample its thumbnail (linked to the full-size image), key, score, label (with its
    class name), source reference, then the result's other columns."""
    links = image_links([str(s["key"]) for s in samples if s["image"] is not None],
                        {str(s["key"]): s["image"] for s in samples if s["image"] is not None}, out_html)
    others = [c for c in columns if c not in ("key",) + LOOKED_UP]
    header = ["#", "image", "key", "score", "label", "source", "shard"] + others
    e = html.escape
    body = []
    for i, s in enumerate(samples):
        label = s.get("label")
        name = classes[label] if classes and isinstance(label, int) and 0 <= label < len(classes) else None
        cells = [str(i + 1), linked_thumbnail(s["image"], links.get(str(s["key"]))), e(str(s["key"])),
                 e(_text(s.get("score"))), e(_text(label) + (f" ({name})" if name else "")),
                 e(_text(s.get("source"))), e(_text(s.get("shard")))] + [e(_text(s.get(c))) for c in others]
        body.append("<tr>" + "".join(f'<td class="text">{c}</td>' for c in cells) + "</tr>")
    shown = f"{len(samples)} of {total} rows" if total > len(samples) else f"{total} rows"
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>dede sql</title>',
        f"<style>{PAGE_CSS}</style></head><body>", "<h1>dede sql</h1>", f"<pre>{e(query)}</pre>",
        f'<p class="muted">{shown}</p>',
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>" + "".join(body) + "</table>",
        "</body></html>",
    ]
    storage.write_bytes(out_html, ("\n".join(page) + "\n").encode("utf-8"))
    return out_html


def inspect_result(table: pa.Table, scores_dir: str, *, query: str, shards_dir: str | None = None,
                   html_out: str | None = None, export_dir: str | None = None, max_rows: int = 50) -> list[str]:
    """`dede sql --html/--export-images`: the page and/or the images of the first max_rows result rows;
    returns what was written (the page, then the image files)."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"--max-rows must be a positive int, got {max_rows!r}")
    shards_dir = shards_for(scores_dir, shards_dir)
    samples = result_samples(table, scores_dir, shards_dir, max_rows)
    written = []
    if html_out is not None:
        classes = read_manifest(shards_dir).classes
        written.append(write_query_page(samples, table.column_names, html_out, query=query, total=table.num_rows,
                                        classes=classes))
    if export_dir is not None:
        written += export_images(samples, export_dir)
    return written
