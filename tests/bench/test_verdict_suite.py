"""The verdict suite's machinery on tiny inputs: the corpora it writes and how it judges a corpus."""

from __future__ import annotations

import numpy as np
import torch

from bench import verdict_corpora
from bench.cases import CASES
from bench.verdict_eval import VARIANTS, judge
from bench.verdict_report import render_verdict


def test_near_duplicate_groups_make_up_five_percent_and_poison_is_marked(tmp_path, monkeypatch):
    images = torch.randint(0, 256, (200, 3, 16, 16), dtype=torch.uint8)
    monkeypatch.setattr(verdict_corpora, "_clean", lambda case, count: (images, torch.arange(200) % 4))
    sizes = verdict_corpora.write_near_duplicates(CASES["sticker64-photos"], tmp_path / "dups")
    files = sorted(p.name for p in (tmp_path / "dups").rglob("*.*"))
    assert sum(sizes) == 10 and all(2 <= s <= 50 for s in sizes) and len(files) == 200
    assert sum("-copy" in f for f in files) == sum(sizes) - len(sizes)


def test_judge_scores_every_design_on_the_same_corpus():
    rng = np.random.default_rng(0)
    n = 600
    keys = np.array([f"{'x/poison' if i < 12 else '1/c'}{i:05d}" for i in range(n)])
    frame = {"key": keys, "shard": np.array(["000000.tar"] * n)}
    for column in ("score", "recon_error", "knn_score", "collapse", "kdist_distinct", "kdist_5", "dao"):
        frame[column] = np.exp(rng.normal(0, 0.2, n))
    frame["collapse"][:12] *= 10
    result = judge(frame, None)
    default = result["variants"][next(iter(VARIANTS))]
    assert result["poisoned"] == 12 and default["recall"] == 1.0 and default["precision"] >= 0.9
    assert default["auroc"] > 0.99 and result["signals"]["collapse"] > 0.99 and set(result["variants"]) == set(VARIANTS)
    report = {"config": {"cases": ["c"]}, "results": [{"case": "c", "works": True, "aux": "in", "aux_poison": 0.01,
                                                      "trigger": "sticker", "corpora": {"poison-0.01": result | {
                                                          "default_rule": default, "fpr_0.05": default}}}],
              "machine": "m", "date": "d", "wall_s": 1.0, "finished": True}
    text = render_verdict(report, "verdict")
    assert "| c | sticker | in 1.0% | poison-0.01 | 12 / 600 |" in text and "Designs side by side" in text
