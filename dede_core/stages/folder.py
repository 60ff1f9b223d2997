"""A stage's output folder: claimed with the identity of what makes its outputs, one marker per finished unit.

Every stage that writes a folder of per-shard outputs uses it the same way (as datatrove's executors handle
completions once for every step): `claim` the folder before any work; skip a unit whose `done` marker is there;
write the unit's outputs (`storage.AtomicFile`), then `mark_done` last; `mark_failed` records why a unit could
not be made, and is cleared when it is. Rerunning the same command is the recovery procedure.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from dede_core.io import storage
from schemas.names import DONE_DIR, FAILED_DIR

# check(old_record) -> True to rewrite the record with the new one (the run grew), False to keep it; raises
# ValueError naming the differences when the folder belongs to another setup.
Check = Callable[[dict[str, Any]], bool]


def stem(name: str) -> str:
    """'000003.tar' -> '000003': the unit's name in marker and output file names."""
    return os.path.splitext(name)[0]


def refuse(folder: str, what: str, diffs: list[str], hint: str = "") -> None:
    """ValueError naming the settings that differ, when any do: two setups' outputs never mix in one folder."""
    if diffs:
        raise ValueError(f"{folder} holds {what} made with other settings ({'; '.join(diffs)}); {hint}"
                         f"write into a new folder, or delete {folder} first")


def claim(folder: str, record_name: str, record: dict[str, Any], *, check: Check) -> None:
    """Make `folder` this run's. A folder with no record must hold nothing but empty marker folders and
    temporaries (else ValueError: nothing says what made its files); it gets `record` (first writer wins
    among parallel workers). A folder with a record is this run's when `check(old)` accepts it."""
    path = storage.join(folder, record_name)
    if not storage.isfile(path):
        strays = [n for n in _contents(folder) if n != record_name]
        if strays:
            raise ValueError(f"{folder} is not empty: it holds {', '.join(sorted(strays)[:3])} but no {record_name}, "
                             f"so nothing says what made them; write into a new or empty folder, or delete {folder}")
        storage.makedirs(storage.join(folder, DONE_DIR))
        if storage.create_once(path, record):
            return
    storage.makedirs(storage.join(folder, DONE_DIR))
    if check(storage.read_json(path)):
        storage.write_json(path, record)


def _contents(folder: str) -> list[str]:
    """Files of a folder and of its marker folders, temporaries left out."""
    names = []
    for sub in ("", DONE_DIR, FAILED_DIR):
        where = storage.join(folder, sub) if sub else folder
        for name in storage.listdir(where) if storage.isdir(where) else []:
            if name not in (DONE_DIR, FAILED_DIR) and not storage.TEMPORARY.fullmatch(name):
                names.append(f"{sub}/{name}" if sub else name)
    return names


class Markers:
    """The done / failed markers of one claimed folder: FOLDER/_done/<stem>.json, FOLDER/_failed/<stem>.json."""

    def __init__(self, folder: str) -> None:
        self.folder = folder  # claim() makes FOLDER/_done; _failed/ appears once something fails

    def path(self, unit: str, suffix: str = ".json", *, failed: bool = False) -> str:
        return storage.join(self.folder, FAILED_DIR if failed else DONE_DIR, stem(unit) + suffix)

    def done(self, unit: str) -> dict[str, Any] | None:
        """The unit's marker, or None when it is not finished (or the marker is unreadable: redo it)."""
        try:
            return storage.read_json(self.path(unit))
        except (OSError, ValueError):
            return None

    def all_done(self) -> list[dict[str, Any]]:
        where = storage.join(self.folder, DONE_DIR)
        return [m for m in (self.done(n) for n in storage.listdir(where) if n.endswith(".json")) if m]

    def mark_done(self, unit: str, marker: dict[str, Any]) -> None:
        """Written last, after the unit's outputs: the unit is finished. Clears an earlier failure."""
        storage.write_json(self.path(unit), marker)
        failed = self.path(unit, failed=True)
        if storage.isfile(failed):
            storage.unlink(failed)

    def mark_failed(self, unit: str, error: str) -> None:
        storage.makedirs(storage.join(self.folder, FAILED_DIR))
        storage.write_json(self.path(unit, failed=True), {"shard": unit, "error": error})

    def failure(self, unit: str) -> str | None:
        path = self.path(unit, failed=True)
        return storage.read_json(path).get("error", "") if storage.isfile(path) else None

    def sweep(self) -> list[str]:
        """Delete temporaries a killed run left (call before any parallel task of this run starts)."""
        return storage.sweep_temporaries(self.folder, (DONE_DIR, FAILED_DIR))
