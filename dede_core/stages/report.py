"""One HTML page about a selection: score histogram with the threshold, counts (overall and dropped per label),
how the threshold was chosen, and thumbnails of the most-flagged samples and of those just below the threshold.

Thumbnails and the plot are inlined as base64 PNG, so the page reads alone; each thumbnail links to its
full-size image, written beside the page in `<page>_images/`. Every key and text from the data goes through
html.escape: keys and error messages come from the corpus, not from us.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from urllib.parse import quote

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from dede_core.io import storage
from dede_core.detector.health import describe_health
from dede_core.stages.select import Selection, format_number, hit_sql, scored_sql
from dede_core.stages.report_verdict import tight_groups, verdict_html
from dede_core.io.sample_images import read_images  # noqa: F401 - the pages' image reader, used here and re-exported
from dede_core.sql import connect, has_view
from schemas import names
from schemas.manifest import read_manifest
from schemas.tables import STATUS_SKIPPED

THUMB_MIN = 96  # small images (CIFAR's 32x32) are enlarged by a whole factor, nearest neighbour: no blur
THUMB_MAX = 160

PAGE_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:12px;word-break:break-all}
figure img{image-rendering:pixelated;display:block;max-width:160px}.muted{color:#777}
td img{image-rendering:pixelated;display:block;max-width:160px}td.text{text-align:left;word-break:break-all}"""
WEB_FORMATS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}  # shown as they are


def _png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _histogram(values: np.ndarray, calibration: np.ndarray | None, threshold: float | None, column: str) -> str:
    """The histogram as base64 PNG; densities when the calibration scores are overlaid (sizes differ)."""
    fig = Figure(figsize=(8, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    both = values if calibration is None else np.concatenate([values, calibration])
    if both.size:
        bins = np.histogram_bin_edges(both, bins=60)
        density = calibration is not None
        ax.hist(values, bins=bins, alpha=0.65, density=density, label=f"corpus ({values.size})")
        if calibration is not None:
            ax.hist(calibration, bins=bins, alpha=0.5, density=True, label=f"held-out calibration ({calibration.size})")
        ax.set_ylabel("density" if density else "samples")
    else:
        ax.text(0.5, 0.5, "no scored samples", ha="center", transform=ax.transAxes)
    if threshold is not None:
        ax.axvline(threshold, color="crimson", linestyle="--", label=f"threshold {format_number(threshold)}")
    ax.set_xlabel(column)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnail(data: bytes | None) -> str:
    """An <img> (or a note saying why there is none) for one sample's encoded bytes."""
    if data is None:
        return '<div class="muted">image not found in the shards</div>'
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        image = image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - the corpus may hold anything; the report still renders
        return f'<div class="muted">cannot decode: {html.escape(str(e))}</div>'
    side = max(image.size)
    if side < THUMB_MIN:
        factor = math.ceil(THUMB_MIN / side)
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    elif side > THUMB_MAX:
        image.thumbnail((THUMB_MAX, THUMB_MAX))
    return f'<img alt="" src="data:image/png;base64,{_png_base64(image)}">'


def full_size(data: bytes) -> tuple[bytes, str]:
    """(bytes, extension) a browser shows: the original bytes when it can, else a PNG of them; raw as .bin
    when they do not decode."""
    try:
        image = Image.open(io.BytesIO(data))
        kind = image.format
        if kind in WEB_FORMATS:
            return data, WEB_FORMATS[kind]
        image.load()
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"
    except Exception:  # noqa: BLE001 - the corpus may hold anything
        return data, "bin"


def write_images(images: list[tuple[str, bytes]], folder: str) -> list[str]:
    """Write each (key, bytes) as FOLDER/NNNN-<key>.<ext>, numbered in the given order so that a file viewer
    shows them in that order; returns the file names."""
    storage.makedirs(folder)
    files = []
    for rank, (key, data) in enumerate(images):
        body, ext = full_size(data)
        files.append(f"{rank:04d}-{re.sub(r'[^A-Za-z0-9_-]+', '_', key)[:80]}.{ext}")
        storage.write_bytes(storage.join(folder, files[-1]), body)
    return files


def image_links(keys: list[str], images: dict[str, bytes], out_html: str) -> dict[str, str]:
    """key -> relative link to its full-size image, written to `<out_html stem>_images/` (the page's own folder:
    images an earlier page linked to are removed)."""
    found = [k for k in dict.fromkeys(keys) if k in images]
    stem = os.path.splitext(storage.basename(out_html))[0] + names.IMAGES_SUFFIX
    folder = storage.join(os.path.dirname(out_html) or ".", stem)
    files = write_images([(k, images[k]) for k in found], folder) if found else []
    if storage.isdir(folder):
        for name in set(storage.listdir(folder)) - set(files):
            if re.fullmatch(r"\d{4}-.+", name):
                storage.unlink(storage.join(folder, name))
    return {k: f"{quote(stem)}/{quote(n)}" for k, n in zip(found, files)}


def linked_thumbnail(data: bytes | None, link: str | None) -> str:
    """The thumbnail, wrapped in a link to the full-size image when there is one."""
    thumb = _thumbnail(data)
    return f'<a href="{html.escape(link)}">{thumb}</a>' if link else thumb


def _gallery(rows: list[tuple[str, str, float | None]], images: dict[str, bytes], column: str,
             links: dict[str, str]) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    figures = []
    for key, shard, value in rows:
        shown = "NULL" if value is None else format_number(value)
        figures.append(f"<figure>{linked_thumbnail(images.get(key), links.get(key))}<figcaption>"
                       f"{html.escape(key)}<br>{html.escape(column)} {html.escape(shown)} <span class=muted>"
                       f"{html.escape(shard)}</span></figcaption></figure>")
    return '<div class="grid">' + "".join(figures) + "</div>"


def _by_label(conn, selection: Selection, shards_dir: str) -> str:
    """A table: per label, its class name (from the shards manifest), samples and how many were dropped."""
    conn.register("dropped_rows", selection.dropped)
    rows = conn.execute(
        f"SELECT s.label, count(*), count(d.key) FROM scores s LEFT JOIN dropped_rows d USING (shard, key) "
        f"WHERE s.status <> '{STATUS_SKIPPED}' GROUP BY s.label ORDER BY s.label NULLS LAST").fetchall()
    try:
        classes = read_manifest(shards_dir).classes or []
    except (OSError, ValueError):
        classes = []
    named = [[("none" if label is None else label),
              classes[label] if label is not None and 0 <= label < len(classes) else "",
              n, d, f"{100 * d / n:.1f}%"] for label, n, d in rows]
    return _table(["label", "class", "samples", "dropped", "dropped %"], named)


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _query(scores_dir: str, shards_dir: str, selection: Selection, column: str, n_thumbs: int) -> tuple:
    """(the corpus' scored values, the calibration values or None, the most-flagged rows, the rows just below
    the threshold, the dropped-per-label table) for the report."""
    rule = selection.rule
    scored, hit = scored_sql(rule), hit_sql(rule, selection.threshold)
    value_sql = f"SELECT {column} FROM {{view}} WHERE {column} IS NOT NULL AND isfinite({column})"
    conn = connect(scores_dir)
    view = "scores"
    try:
        if selection.verdict is not None:  # judged on the combined p-value: evidence = -log10 p
            conn.register("verdict_rows", selection.verdict.table)
            view = ("(SELECT s.*, v.q_value, -log10(greatest(v.p_combined, 1e-300)) AS evidence FROM scores s "
                    "JOIN verdict_rows v USING (shard, key))")
        values = conn.sql(value_sql.format(view=view) + f" AND {scored}").to_arrow_table().column(0).to_numpy()
        calibration = None
        if view == "scores" and has_view(conn, "calibration"):
            calibration = conn.sql(value_sql.format(view="calibration")).to_arrow_table().column(0).to_numpy()
        top = (f"SELECT key, shard, {column} FROM {view} WHERE {scored} AND {{cond}} "
               f"ORDER BY {column} DESC NULLS LAST, key LIMIT ?")
        flagged = conn.execute(top.format(cond=hit), [n_thumbs // 2]).fetchall()
        below = conn.execute(top.format(cond=f"NOT {hit}"), [n_thumbs - n_thumbs // 2]).fetchall()
        by_label = _by_label(conn, selection, shards_dir)
    finally:
        conn.close()
    return values, calibration, flagged, below, by_label


def write_report(scores_dir: str | os.PathLike, shards_dir: str | os.PathLike, out_html: str | os.PathLike, *,
                 selection: Selection, n_thumbs: int = 24) -> str:
    """Write the HTML report of `selection` over SCORES and SHARDS, with n_thumbs thumbnails (half the most
    flagged, half just below the threshold) linked to their full-size images in `<report>_images/`; returns its
    path."""
    if isinstance(n_thumbs, bool) or not isinstance(n_thumbs, int) or n_thumbs < 0:
        raise ValueError(f"n_thumbs must be a non-negative int, got {n_thumbs!r}")
    scores_dir, shards_dir, out_html = (os.fspath(p) for p in (scores_dir, shards_dir, out_html))
    rule, threshold = selection.rule, selection.threshold
    column = "evidence" if selection.verdict is not None else rule.column or "score"
    values, calibration, flagged, below, by_label = _query(scores_dir, shards_dir, selection, column, n_thumbs)
    groups = [] if selection.verdict is None else tight_groups(selection.verdict.summary.get("neighbours"),
                                                               selection.verdict.table)
    wanted: dict[str, set[str]] = {}
    for key, shard in [(k, s) for k, s, _ in flagged + below] + [m for g in groups for m in g["members"]]:
        wanted.setdefault(shard, set()).add(key)
    images = read_images(shards_dir, wanted)
    links = image_links([key for key, _, _ in flagged + below], images, out_html)
    found = [] if selection.verdict is None else verdict_html(
        selection, groups, lambda key: linked_thumbnail(images.get(key), links.get(key)))

    c = selection.counts
    reasons: dict[str, int] = {}
    for reason in selection.dropped.column("reason").to_pylist():
        reasons[reason] = reasons.get(reason, 0) + 1
    top_reasons = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    below_title = "Just below the threshold" if threshold is not None else "Highest-scored samples kept"
    unscored = "kept" if selection.keep_unscored else "dropped"
    shown_threshold = "none" if threshold is None else f"{format_number(threshold)} (exactly {threshold!r})"
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>dede selection report</title>',
        f"<style>{PAGE_CSS}</style></head><body>", "<h1>dede selection report</h1>",
        f"<p>scores <code>{e(storage.absolute(scores_dir))}</code>, shards <code>{e(storage.absolute(shards_dir))}"
        f"</code><br>detector <code>{e(str(selection.detector_hash))}</code>, encoder "
        f"<code>{e(str(selection.encoder_id))}</code></p>",
        "<h2>How the threshold was chosen</h2>", f"<p>{e(selection.how)}</p>",
        f"<p>rule <code>{e(rule.label)}</code>; threshold <b>{e(shown_threshold)}</b>; "
        f"samples without a score are {unscored}.</p>",
        f"<p class=health>{e(describe_health(selection.detector_health))}</p>",
        *found,
        "<h2>Counts</h2>",
        _table(["total", "kept", "dropped", "unscored"], [[c.total, c.kept, c.dropped, c.unscored]]),
        '<p class="muted">over the rows of the scores table</p>',
        "<h2>Dropped per label</h2>", by_label,
        "<h2>Score distribution</h2>",
        f'<img alt="histogram of {e(column)}" src="data:image/png;base64,'
        f'{_histogram(values, calibration, threshold, column)}">',
        "<h2>Most flagged</h2>", _gallery(flagged, images, column, links),
        f"<h2>{below_title}</h2>", _gallery(below, images, column, links),
        "<h2>Reasons for dropping</h2>", _table(["reason", "samples"], [[r, n] for r, n in top_reasons]),
        "</body></html>",
    ]
    if not storage.is_url(out_html):
        os.makedirs(os.path.dirname(os.path.abspath(out_html)), exist_ok=True)
    storage.write_bytes(out_html, ("\n".join(parts) + "\n").encode("utf-8"))
    return out_html
