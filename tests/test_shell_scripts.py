"""Every shell script in the repository passes shellcheck (download.sh has its own, stricter tests)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from helpers import ROOT

SCRIPTS = [ROOT / ".ci" / "run", *sorted((ROOT / "scripts").glob("*.sh"))]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_gpu_session_names_every_step_it_runs():
    text = (ROOT / "scripts" / "gpu_session.sh").read_text()
    steps = text.split("STEPS=${STEPS:-", 1)[1].split("}", 1)[0].split()
    assert steps and all(f"step {name} " in text for name in steps)
