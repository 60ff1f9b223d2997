"""The `dede` console script: every command of the product, plus `bench`, `demo` and `data` when the bench
extra is installed. Prefect is imported only by the commands that run a flow, so --help stays fast."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from flows import prefect_defaults
from flows.cli.startup import STARTUP_DEFAULT_S, STARTUP_SETTING, hold_on_busy_machine, run_flow

__all__ = ["main", "build_parser", "run_flow", "hold_on_busy_machine", "STARTUP_SETTING", "STARTUP_DEFAULT_S"]


class _Stderr(logging.Handler):
    """The `dede` logger's lines on whatever sys.stderr is when they are written (a test may have swapped it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = "warning: " if record.levelno == logging.WARNING else ""
            sys.stderr.write(prefix + self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never take the command down
            self.handleError(record)


def log_to_stderr() -> None:
    """Library messages (logging.getLogger("dede")) as plain lines on stderr, once per process."""
    logger = logging.getLogger("dede")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # Prefect's console handler on the root logger would print every line twice


def build_parser():
    from flows.cli.parser import build_parser as build

    return build()


def main(argv: list[str] | None = None) -> int:
    """Run one command; a ValueError/FileNotFoundError/ImportError is printed as `dede CMD: error: ...` (exit 2)."""
    prefect_defaults()  # before any command imports prefect: no telemetry, dede's logger in the run logs
    hold_on_busy_machine()
    log_to_stderr()
    args = build_parser().parse_args(argv)
    func: Callable = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"dede {args.command}: error: {exc}", file=sys.stderr)
        return 2
