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

# Prefect settings dede needs unless the user set them; Prefect reads them from the environment when it is
# imported, so they are set here, before any flow module imports prefect.
PREFECT_DEFAULTS = {
    # The library logs to logging.getLogger("dede"); Prefect attaches its run-log handler to the loggers named
    # here, so progress and warnings of every stage reach the Prefect UI.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "dede",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # a library call outside any flow
    # No usage reports: the temporary server's telemetry service phones home (an ERROR line "Failed to send
    # telemetry" on a machine without internet), and the client's analytics follow this same server setting.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def prefect_defaults() -> None:
    """Set PREFECT_DEFAULTS in the environment where the user has not set them; call before importing prefect."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


prefect_defaults()

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
