"""The report's account of the combined verdict: what each signal found, and the tightest groups of the corpus'
neighbourhoods with their members' thumbnails (a trigger is visible once its samples sit side by side)."""

from __future__ import annotations

import html

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dede_core.io import storage
from dede_core.signals.gather import neighbours_files
from dede_core.signals.verdict import describe
from dede_core.stages.select import Selection

GROUPS_SHOWN = 5  # the tightest groups in the report
MEMBERS_SHOWN = 12  # thumbnails per group


def tight_groups(neighbours_dir: str | None, verdict: pa.Table, groups: int = GROUPS_SHOWN,
                 members: int = MEMBERS_SHOWN) -> list[dict]:
    """The tightest groups (group_size >= 2) of the neighbours table, those with flagged members first:
    [{group_id, size, flagged, median_kdist_5, members: [(key, shard)]}]."""
    files = neighbours_files(neighbours_dir)
    if not files:
        return []
    parts = []
    for path in files:
        with storage.open_read(path) as f:
            parts.append(pq.read_table(f, columns=["key", "shard", "group_id", "group_size", "kdist_5"]))
    table = pa.concat_tables(parts)
    table = table.filter(pc.greater_equal(table["group_size"], 2))
    if table.num_rows == 0:
        return []
    flagged = set(verdict.filter(verdict["verdict"]).column("key").to_pylist())
    found: dict[int, dict] = {}
    for key, shard, gid, size, kdist in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        g = found.setdefault(gid, {"group_id": gid, "size": size, "flagged": 0, "kdists": [], "members": []})
        g["flagged"] += key in flagged
        g["kdists"].append(np.nan if kdist is None else kdist)
        if len(g["members"]) < members:
            g["members"].append((key, shard))
    for g in found.values():
        g["median_kdist_5"] = float(np.nanmedian(g.pop("kdists")))
    return sorted(found.values(), key=lambda g: (g["flagged"] == 0, g["median_kdist_5"]))[:groups]


def verdict_html(selection: Selection, groups: list[dict], thumbnail) -> list[str]:
    """HTML parts: the signal lines and each group's grid; thumbnail(key) -> an <img> (or a note)."""
    summary = selection.verdict.summary
    e = html.escape
    parts = ["<h2>What was found</h2>", "<ul>" + "".join(f"<li>{e(line)}</li>" for line in describe(summary)) + "</ul>"]
    if not groups:
        parts.append('<p class="muted">no tight group in the corpus (or the neighbours stage did not run)</p>')
    for g in groups:
        figures = "".join(f"<figure>{thumbnail(key)}<figcaption>{e(key)}</figcaption></figure>"
                          for key, _ in g["members"])
        parts += [f"<h3>group {g['group_id']}: {g['size']} samples, {g['flagged']} flagged, median 5-NN cosine "
                  f"distance {g['median_kdist_5']:.4f}</h3>", f'<div class="grid">{figures}</div>']
    return parts
