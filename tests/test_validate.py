"""`python -m embtools.validate`: the installation check."""

from __future__ import annotations

import subprocess
import sys

import pytest

from embtools import validate


def test_validate_passes_in_a_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "embtools.validate"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].endswith(" 0 failed")
    checks = [line for line in lines if line.startswith("[PASS]")]
    names = " ".join(checks)
    for expected in ("imports", "backend numpy", "store round trip", "config hashing"):
        assert expected in names
    from embtools.backends import available_backends

    for name in available_backends():
        assert f"backend {name}" in names


def test_a_failing_check_gives_exit_code_1(monkeypatch, capsys):
    def broken() -> str:
        raise AssertionError("planted failure")

    monkeypatch.setattr(validate, "_check_config", broken)
    assert validate.main([]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] config hashing" in out and "planted failure" in out


@pytest.mark.parametrize("name", ["imports", "config hashing"])
def test_checks_without_other_modules_pass(name):
    results = {r.name: r for r in validate.run_checks()}
    assert results[name].ok, results[name].detail
