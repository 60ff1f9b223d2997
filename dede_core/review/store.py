"""The reviewer's decisions, RUN/review/decisions.parquet: the only file the review app writes.

One row per key (the latest decision replaces an earlier one); every change rewrites the whole file through
storage.write_parquet (temporary name, fsync, rename), so a crash leaves the old file or the new one, never half.
`dede clean --decisions` reads the same file (dede_core.stages.decisions).
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone

import pyarrow as pa

from dede_core.io import storage
from dede_core.stages.decisions import read_decisions
from schemas.names import DECISIONS as DECISIONS_FILE
from schemas.names import REVIEW_DIR
from schemas.tables import DECISION_DROP, DECISION_KEEP, DECISIONS, with_metadata

MAX_NOTE = 2000  # characters of a note: a reason, not a document


class DecisionStore:
    """Load, change and save the decisions of one run; safe to call from the app's worker threads."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.folder = os.path.join(os.path.abspath(os.fspath(run_dir)), REVIEW_DIR)
        self.path = os.path.join(self.folder, DECISIONS_FILE)
        self._lock = threading.Lock()
        self._rows: dict[str, dict] = {}
        if os.path.isfile(self.path):
            self._rows = {r["key"]: r for r in read_decisions(self.path).to_pylist()}

    def rows(self) -> list[dict]:
        """Every decision, newest first."""
        with self._lock:
            return sorted(self._rows.values(), key=lambda r: (r["decided_at"], r["key"]), reverse=True)

    def by_key(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._rows)

    def decide(self, keys: list[str], decision: str, note: str | None = None, group: str | None = None) -> int:
        """Record one decision for each key (replacing earlier ones) and save; returns how many keys."""
        if decision not in (DECISION_KEEP, DECISION_DROP):
            raise ValueError(f"decision must be {DECISION_KEEP!r} or {DECISION_DROP!r}, got {decision!r}")
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("give at least one sample key (a non-empty string)")
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
            raise ValueError(f"the note must be text of at most {MAX_NOTE} characters")
        now = datetime.now(timezone.utc)
        with self._lock:
            rows = dict(self._rows)
            for key in keys:
                rows[key] = {"key": key, "decision": decision, "note": note or None, "decided_at": now,
                             "group": group}
            self._save(rows)
            self._rows = rows
        return len(keys)

    def forget(self, keys: list[str]) -> int:
        """Remove the decisions of `keys` (back to the rule's verdict) and save; returns how many there were."""
        with self._lock:
            rows = {k: v for k, v in self._rows.items() if k not in set(keys)}
            removed = len(self._rows) - len(rows)
            self._save(rows)
            self._rows = rows
        return removed

    def _save(self, rows: dict[str, dict]) -> None:
        os.makedirs(self.folder, exist_ok=True)
        ordered = [rows[k] for k in sorted(rows)]
        schema = with_metadata(DECISIONS, "decisions", "{}")
        storage.write_parquet(self.path, pa.Table.from_pylist(ordered, schema=schema))
