"""Each signal's AUROC in a finished run against the keys known to be poisoned (for a corpus whose poison is
known: the demo's, or one planted outside the repository).

    python -m bench.verdict_check RUN --planted KEYS.json

RUN is a `dede sanitize` folder cleaned with the default rule (RUN/clean/verdict.parquet); KEYS.json a JSON list
of keys, or an object with one ("keys", as `dede demo` writes corpus.planted.json). Prints, per p-value column,
the AUROC of -log10 p with the planted samples as positives, the median 5-NN distance of both kinds in
RUN/neighbours, and the cut's precision and recall.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow.parquet as pq

from bench.metrics import auroc
from dede_core.signals.gather import neighbours_files


def check(run: str, planted: set[str], clean: str | None = None) -> dict[str, float | int | None]:
    table = pq.read_table(os.path.join(clean or os.path.join(run, "clean"), "verdict.parquet")).to_pydict()
    positive = np.array([k in planted for k in table["key"]])
    out: dict[str, float | int | None] = {"samples": len(positive), "planted": int(positive.sum())}
    for column in [c for c in table if c.startswith("p_")]:
        evidence = -np.log10(np.clip(np.asarray(table[column], dtype=float), 1e-300, 1))
        evidence = np.where(np.isfinite(evidence), evidence, 0.0)
        out[f"auroc {column}"] = round(auroc(evidence[~positive], evidence[positive]), 4)
    near = pq.read_table(neighbours_files(os.path.join(run, "neighbours")), columns=["key", "kdist_5"]).to_pydict()
    inside = np.array([k in planted for k in near["key"]])
    kdist = np.asarray(near["kdist_5"], dtype=float)
    out |= {"median kdist_5 planted": round(float(np.nanmedian(kdist[inside])), 4),
            "median kdist_5 others": round(float(np.nanmedian(kdist[~inside])), 4)}
    flagged = np.asarray(table["verdict"], dtype=bool)
    hits = int((flagged & positive).sum())
    out |= {"flagged": int(flagged.sum()), "precision": hits / flagged.sum() if flagged.any() else None,
            "recall": hits / positive.sum() if positive.any() else None}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--planted", required=True)
    p.add_argument("--clean", default=None, help="the clean folder to read (default RUN/clean)")
    args = p.parse_args()
    with open(args.planted) as f:
        keys = json.load(f)
    for name, value in check(args.run, set(keys if isinstance(keys, list) else keys["keys"]), args.clean).items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    main()
