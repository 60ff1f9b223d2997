"""What the `dede` entry point sets before Prefect is imported: no telemetry unless the user asks for it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flows.cli import main

ANALYTICS = "PREFECT_SERVER_ANALYTICS_ENABLED"


def _help() -> None:
    with pytest.raises(SystemExit):  # --help exits after the entry point has set the environment
        main(["--help"])


def test_the_cli_turns_prefect_analytics_off_when_unset(monkeypatch, capsys):
    monkeypatch.delenv(ANALYTICS, raising=False)
    _help()
    assert os.environ[ANALYTICS] == "false"


def test_the_users_own_analytics_setting_is_left_alone(monkeypatch, capsys):
    monkeypatch.setenv(ANALYTICS, "true")
    _help()
    assert os.environ[ANALYTICS] == "true"


def test_prefect_itself_reads_analytics_off_in_a_fresh_cli_process():
    """In a process started without the setting (as a user's shell starts `dede`), Prefect sees it off."""
    code = ("from flows.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "from prefect.settings import get_current_settings\n"
            "print('ANALYTICS', get_current_settings().server.analytics_enabled)\n")
    env = {k: v for k, v in os.environ.items() if k != ANALYTICS}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ANALYTICS False" in out.stdout
