"""Ctrl-C, as a real SIGINT sent to the programs: one line, `interrupted`, and exit status 130, whether it comes
while torch is being imported, while a model loads, or at the chat prompt with piped input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT

ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
DEADLINE = 120  # seconds any one program may take to reach the moment a test waits for, on a loaded machine


def _maps_torch(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _interrupt(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see torch being loaded")
@pytest.mark.parametrize("command", [["example_text_completion.py"], ["-m", "llama", "chat"],
                                     ["-m", "llama.serve", "--port", "0"]], ids=" ".join)
def test_ctrl_c_while_torch_is_imported(command):
    """The signal comes while the process is importing torch (its library mapped, nothing printed yet)."""
    proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + DEADLINE
    while not _maps_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None and _maps_torch(proc.pid), "the program never loaded torch"
    done = _interrupt(proc)
    assert (done.returncode, done.stderr.strip()) == (130, "interrupted"), done.stderr[-2000:]
    assert done.stdout == "", "the signal came after the imports: this test did not test them"


def test_ctrl_c_at_a_piped_chat_prompt():
    """`... | python chat.py`: Ctrl-C while the chat waits for the next line ends it as interrupted."""
    proc = subprocess.Popen([sys.executable, "chat.py"], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, deadline = "", time.monotonic() + DEADLINE
    while not seen.endswith("\n> ") and time.monotonic() < deadline:
        char = proc.stdout.read(1)
        if not char:
            break
        seen += char
    assert seen.endswith("\n> "), seen[-2000:]
    time.sleep(0.2)  # in readline(), waiting for input
    done = _interrupt(proc)
    assert (done.returncode, done.stderr.strip()) == (130, "interrupted"), done.stderr[-2000:]
