"""tests/forked.py, the harness that runs programs as forks of a process that imported torch once, gives what a new
interpreter gives: the same standard output, standard error and exit status, byte for byte."""

import subprocess
import sys

import pytest

from helpers import PROGRAM_ENV, ROOT, run_program


@pytest.mark.parametrize("argv", [
    ["example_text_completion.py", "--max-seqlen", "64"],  # a script's own error, exit status 2
    ["-m", "llama", "reshard", "--help"],  # a module, its usage naming the program as it was run
    ["-c", "import llama, sys; print(sys.argv, sys.path[0] == ''); raise RuntimeError('boom')"],  # a traceback
], ids=["script", "module", "code"])
def test_a_forked_run_equals_a_new_interpreter(argv):
    forked = run_program(*argv)
    fresh = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=PROGRAM_ENV,
                           stdin=subprocess.DEVNULL, timeout=120)
    assert fresh.stdout or fresh.stderr
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
