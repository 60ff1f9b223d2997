"""docs/api.md: every Python snippet runs, in order, against a tiny run."""

from __future__ import annotations

import os
import re

from test_verdicts import FakeHFDataset, make_run

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")


def test_api_snippets_run(tmp_path, image_folder, tiny_detector, monkeypatch, capsys):
    run = make_run(str(image_folder), str(tmp_path / "run"), tiny_detector)
    monkeypatch.setenv("DEDE_RUN", run)
    monkeypatch.setenv("DEDE_CORPUS", str(image_folder))
    blocks = re.findall(r"```python\n(.*?)```", open(DOC).read(), flags=re.S)
    assert len(blocks) == 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, DOC, "exec"), namespace)
    kept = namespace["verdicts"].kept_keys()
    assert len(namespace["train"]) == len(kept) and "files kept" in capsys.readouterr().out
    dropped = namespace["dropped"].column("key").to_pylist()
    rows = FakeHFDataset([{"id": k} for k in sorted(kept) + dropped])
    assert {r["id"] for r in namespace["keep_only_kept"](rows).rows} == set(kept)
