"""tests/forked.py, the harness that runs programs as forks of a process that imported torch once, gives what a new
interpreter gives: the same standard output, standard error and exit status, byte for byte."""

import shlex
import subprocess
import sys

import pytest

from forked import install_python
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


@pytest.mark.parametrize("command", [
    "python example_text_completion.py --max-seqlen 64",  # a script's own error
    "printf 'a\\nb\\n' | python -c 'import sys; print(sys.stdin.read().split(), sys.argv); sys.exit(3)' x y",
    "python -m llama reshard --help | python -c 'import sys; print(len(sys.stdin.read()) > 100)'",  # a pipeline
    "python -c 'import llama; raise RuntimeError(\"boom\")'",  # a traceback
], ids=["script", "stdin-and-status", "pipeline", "code"])
def test_the_shell_command_equals_a_new_interpreter(command, tmp_path):
    """install_python's `python`, as README's bash blocks run it: what bash sees equals a real interpreter's."""
    python = install_python(tmp_path, PROGRAM_ENV)
    runs = []
    for program in (str(python), sys.executable):
        shell = f"python() {{ {shlex.quote(program)} \"$@\"; }}; {command}"
        runs.append(subprocess.run(["bash", "-c", shell], capture_output=True, text=True, cwd=ROOT, env=PROGRAM_ENV,
                                   stdin=subprocess.DEVNULL, timeout=120))
    forked, fresh = runs
    assert fresh.stdout or fresh.stderr
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
