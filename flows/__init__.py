"""Prefect 3 flows: thin recipes over dede_core. Without PREFECT_API_URL they run with no server.

dede-shard (flows/shard.py), dede-train (flows/train.py), dede-score (flows/score.py), dede-clean
(flows/clean.py) and dede-sanitize (flows/sanitize.py), which runs the other four as subflows into one RUN folder.
Every stage resumes from its own markers on disk, so rerunning a flow is its recovery procedure; Prefect's own
result caching is off (cache_policy=NONE) for that reason.
"""

from __future__ import annotations

import errno
import os
from typing import Any

# The library logs to logging.getLogger("dede"); Prefect attaches its run-log handler to the loggers named here
# (read when prefect is imported), so progress and warnings of every stage reach the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dede")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # a library call outside any flow

# OSErrors a retry can cure: a busy or flaky (network) file system, an interrupted call. Never a missing or
# forbidden file, and never ValueError: those fail the same way every time.
TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ESTALE, errno.ETIMEDOUT})


def is_transient(exc: BaseException | None) -> bool:
    """True for errors known to be transient: connection errors, timeouts, and the OSErrors above."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: go on to the task's retries only when it failed with a transient error."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a result that cannot be read is no evidence of a transient error
        return False
    return is_transient(exc if isinstance(exc, BaseException) else None)
