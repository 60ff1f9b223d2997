"""The HTML report: one self-contained file with the threshold, the counts and escaped thumbnails."""

from __future__ import annotations

from html.parser import HTMLParser

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
