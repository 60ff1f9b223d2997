"""Running a Prefect flow from the command line without a server: the temporary one Prefect starts needs time."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

log = logging.getLogger("dede")

# Prefect starts a temporary server when PREFECT_API_URL is unset and waits this long for it (Prefect's own
# default is 20 s, which a loaded machine misses): our default unless the user set the setting.
STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_DEFAULT_S = 180
STARTUP_FAILED = "ephemeral Prefect API server"  # in Prefect's RuntimeError when the server did not come up


def hold_on_busy_machine() -> None:
    """Give the temporary Prefect server time to start on a busy machine; called before prefect is imported
    (Prefect reads its settings from the environment when it is imported)."""
    os.environ.setdefault(STARTUP_SETTING, str(STARTUP_DEFAULT_S))


def run_flow(command: str, flow: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a flow; when the temporary Prefect server did not start in time, try once more, then fail with a
    message that names the setting. Every stage resumes from its markers, so a second call redoes nothing."""
    for attempt in (1, 2):
        try:
            return flow(*args, **kwargs)
        except RuntimeError as exc:
            if STARTUP_FAILED not in str(exc):
                raise
            if attempt == 2:
                raise ValueError(
                    f"the temporary Prefect server did not start within {os.environ.get(STARTUP_SETTING)} s, "
                    f"twice (the machine is busy?): set {STARTUP_SETTING} higher (e.g. 600), or PREFECT_API_URL "
                    f"to a running server (`prefect server start`), and rerun `dede {command}`") from None
            log.warning("dede %s: the temporary Prefect server did not start within %s s; trying once more",
                        command, os.environ.get(STARTUP_SETTING))
