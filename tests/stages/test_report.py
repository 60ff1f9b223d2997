"""The HTML report: one self-contained file with the threshold, the counts and escaped thumbnails."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dede_core.stages.report import write_report
from dede_core.stages.select import Rule, select
from test_select import png, row, write_scores, write_shards

VOID = {"meta", "img", "br", "hr", "link", "input"}


class TagChecker(HTMLParser):
    """Collects tags and checks that every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_report_is_self_contained_with_threshold_and_escaped_keys(tmp_path):
    evil = "x<script>alert(1)</script>&y"  # keys come from the corpus: anything but a dot
    keys = [f"k{i}" for i in range(7)] + [evil]
    write_shards(str(tmp_path / "shards"), [[{"__key__": k, "png": png(i, size=32)} for i, k in enumerate(keys)]])
    rows = [row(k, "000000.tar", i, 100.0 * (i + 1), 1.0) for i, k in enumerate(keys)]
    rows[2] = row("k2", "000000.tar", 2, None, status="decode_error", error="bad <bytes>")
    write_scores(str(tmp_path / "scores"), rows, [(float(v), 1.0) for v in range(100, 700)])
    sel = select(tmp_path / "scores", Rule.fpr(0.1))
    out = tmp_path / "report" / "report.html"
    write_report(tmp_path / "scores", tmp_path / "shards", out, selection=sel, n_thumbs=4)
    text = out.read_text()

    assert text.startswith("<!DOCTYPE html>") and f"{sel.threshold:.2f}" in text
    assert "95th" not in text and "90th percentile of 600 held-out calibration scores" in text
    checker = TagChecker()
    checker.feed(text)
    assert not checker.errors and checker.stack == []
    assert all(src.startswith("data:image/png;base64,") for src in checker.images)
    assert len(checker.images) == 1 + 4  # the histogram and four thumbnails, all inline
    assert "<script>" not in text and "x&lt;script&gt;alert(1)&lt;/script&gt;&amp;y" in text
    assert "bad &lt;bytes&gt;" in text  # the reason table shows the decode error, escaped
    assert "detector health: not measured" in text  # a hand-made scores folder has no run.json
    flagged = text.split("<h2>Most flagged</h2>")[1].split("<h2>")[0]
    assert "x&lt;script" in flagged and "k6" in flagged  # the two highest scores (800, 700) are above 640
    below = text.split("<h2>Just below the threshold</h2>")[1].split("<h2>")[0]
    assert "k5" in below and "k4" in below


def labelled_corpus(tmp_path, n: int = 12):
    """One shard of n PNGs (one a TIFF, shown as PNG full size), labels 0..2 named by the manifest, scores 100*(i+1)."""
    import io
    import json

    import numpy as np
    from PIL import Image

    samples = []
    for i in range(n):
        data = png(i, size=32)
        if i == n - 1:
            buf = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(buf, format="TIFF")
            data = buf.getvalue()
        samples.append({"__key__": f"cat/k{i:02d}", "tiff" if i == n - 1 else "png": data, "cls": str(i % 3).encode()})
    write_shards(str(tmp_path / "shards"), [samples])
    manifest = tmp_path / "shards" / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"classes": ["ant", "bee", "cow"]}))
    rows = [row(f"cat/k{i:02d}", "000000.tar", i, 100.0 * (i + 1), 1.0) | {"label": i % 3} for i in range(n)]
    write_scores(str(tmp_path / "scores"), rows, [(float(v), 1.0) for v in range(100, 700)])
    return str(tmp_path / "shards"), str(tmp_path / "scores")


def test_report_counts_dropped_per_label_and_links_full_images(tmp_path):
    shards, scores = labelled_corpus(tmp_path)
    sel = select(scores, Rule.threshold(850.0))  # drops k08..k11: labels 2, 0, 1, 2
    out = tmp_path / "report.html"
    write_report(scores, shards, out, selection=sel, n_thumbs=6)
    text = out.read_text()
    by_label = text.split("<h2>Dropped per label</h2>")[1].split("<h2>")[0]
    assert "<td>0</td><td>ant</td><td>4</td><td>1</td>" in by_label
    assert "<td>2</td><td>cow</td><td>4</td><td>2</td>" in by_label
    links = re.findall(r'<a href="([^"]+)">', text)
    assert len(links) == 6 and all((tmp_path / link).is_file() for link in links)
    assert any(link.endswith(".png") and "k11" in link for link in links)  # the TIFF, as PNG for the browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
         "img.setAttribute('data-width', img.naturalWidth); document.body.setAttribute('data-loaded', 'yes'); });"
         "</script>")


def rendered(page: Path) -> str:
    """The page's DOM after Chromium (headless) loaded it, each <img> with its decoded width in data-width."""
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                               "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium)")
def test_report_renders_in_a_browser(tmp_path):
    shards, scores = labelled_corpus(tmp_path)
    out = tmp_path / "report" / "report.html"
    write_report(scores, shards, out, selection=select(scores, Rule.threshold(850.0)), n_thumbs=6)
    dom = rendered(out)
    assert 'data-loaded="yes"' in dom and "Dropped per label" in dom
    widths = [int(w) for w in re.findall(r'data-width="(\d+)"', dom)]
    assert len(widths) == 1 + 6 and min(widths) > 0  # the histogram and every thumbnail decoded
    links = re.findall(r'<a href="([^"]+)"', dom)
    assert len(links) == 6 and all((out.parent / unquote(link)).is_file() for link in links)


def test_a_new_report_removes_the_images_the_old_one_linked(tmp_path):
    shards, scores = labelled_corpus(tmp_path)
    out = tmp_path / "report.html"
    write_report(scores, shards, out, selection=select(scores, Rule.threshold(850.0)), n_thumbs=6)
    write_report(scores, shards, out, selection=select(scores, Rule.threshold(850.0)), n_thumbs=2)
    assert len(list((tmp_path / "report_images").iterdir())) == 2


def test_report_of_the_verdict_says_what_each_signal_found_and_shows_the_tightest_groups(tmp_path):
    keys = [f"k{i:03d}" for i in range(60)]
    write_shards(str(tmp_path / "shards"), [[{"__key__": k, "png": png(i, size=32)} for i, k in enumerate(keys)]])
    rng = np.random.default_rng(0)
    scores, knn = np.exp(rng.normal(0, 0.2, 60)), np.exp(rng.normal(1, 0.2, 60))
    knn[:5] *= 20  # five samples far from every auxiliary image
    rows = [row(k, "000000.tar", i, float(scores[i]), float(knn[i])) for i, k in enumerate(keys)]
    write_scores(str(tmp_path / "scores"), rows, [(1.0, 1.0)] * 10)
    neighbours = tmp_path / "neighbours"
    neighbours.mkdir()
    group = [7 if i < 5 else (8 if i in (20, 21) else i + 100) for i in range(60)]
    size = [5 if i < 5 else (2 if i in (20, 21) else 1) for i in range(60)]
    pq.write_table(pa.table({"key": keys, "shard": ["000000.tar"] * 60, "position": list(range(60)),
                             "kdist_5": [0.01 if i < 5 else 0.3 for i in range(60)],
                             "kdist_distinct": [0.3] * 60, "dao": [1.0] * 60, "collapse": [100.0] * 60,
                             "group_id": group,
                             "group_size": size}), neighbours / "000000.parquet")
    (neighbours / "summary.json").write_text("{}")
    sel = select(tmp_path / "scores", Rule.fdr(0.05))
    assert sorted(sel.dropped.column("key").to_pylist()) == keys[:5]
    out = tmp_path / "report.html"
    write_report(tmp_path / "scores", tmp_path / "shards", out, selection=sel, n_thumbs=4)
    text = out.read_text()
    assert "What was found" in text and "collapse (in the verdict)" in text and "flags 5 of 60" in text
    assert "group 7: 5 samples, 5 flagged" in text and "group 8: 2 samples, 0 flagged" in text
    assert text.index("group 7:") < text.index("group 8:")  # the flagged group first
    checker = TagChecker()
    checker.feed(text)
    assert not checker.errors and len(checker.images) == 1 + 4 + 5 + 2  # histogram, galleries, the two groups
