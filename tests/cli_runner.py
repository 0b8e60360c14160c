"""Drive `fmb` in-process through its real entry point (exit codes and error formatting included)."""

from __future__ import annotations

import sys

import pytest

from fmb import cli


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `fmb ARGS...`."""
    monkeypatch.setattr(sys, "argv", ["fmb", *args])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err
