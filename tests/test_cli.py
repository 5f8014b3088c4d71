"""The programs as a user meets them: help, mistyped flags, errors before loading, Ctrl-C, one rank speaking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import MHA, ROOT, TOKENIZER, make_checkpoint, program_help, run_program, run_torchrun

ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
SCRIPTS = ["example_text_completion.py", "example_chat_completion.py", "chat.py"]


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python ARGS` with empty stdin: a fork of a process that has imported torch (tests/forked.py)."""
    return run_program(*args, timeout=timeout)


def run_fresh(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python ARGS` in a new interpreter, for what only a real start shows (runpy's warnings)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=ENV)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli"), MHA, seed=11)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_with_its_type_and_no_pager(script):
    proc = run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--max_seq_len (int, default" in proc.stdout and "--temperature (float, default 0.6)" in proc.stdout
    assert "Optional" not in proc.stdout and "NoneType" not in proc.stdout
    assert "--top_p (float, default 0.9)\n      nucleus sampling" in proc.stdout  # every flag is explained


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_mistyped_flag_fails_at_once_with_a_suggestion(script, ckpt):
    proc = run(script, "--ckpt_dir", str(ckpt), "--tokenizer_path", str(TOKENIZER), "--max_seqlen", "64")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown flag --max_seqlen; did you mean --max_seq_len? (--help lists the flags)"
    assert "Loading" not in proc.stdout  # nothing was loaded, let alone generated


# Every program, however started: the same one line for a mistyped flag, whichever spelling it was given in.
PROGRAMS = [["example_text_completion.py"], ["example_chat_completion.py"], ["chat.py"], ["-m", "llama.serve"],
            ["-m", "llama", "web"], ["-m", "llama", "chat"], ["-m", "llama", "serve"],
            ["-m", "llama", "convert", "src", "dst"]]


@pytest.mark.parametrize("program", PROGRAMS, ids=" ".join)
def test_every_program_answers_a_mistyped_flag_alike(program):
    proc = run(*program, "--max-seqlen", "64")
    assert proc.returncode == 2, proc.stderr
    close = "--max_seq_len" if "convert" not in program else None  # convert has no such flag: no guess
    hint = f"; did you mean {close}?" if close else ""
    assert proc.stderr == f"error: unknown flag --max-seqlen{hint} (--help lists the flags)\n"


@pytest.mark.parametrize("typed, known, meant", [
    ("--temp", ["--system", "--temperature", "--top_p"], "--temperature"),  # a beginning, not --system
    ("--max_seqlen", ["--max_seq_len", "--max-seq-len", "--max_gen_len"], "--max_seq_len"),
    ("--temprature", ["--temperature", "--top_p"], "--temperature"),  # one letter left out
    ("--max", ["--max_seq_len", "--max_gen_len"], None),  # begins two: no guess
    ("--sytem", ["--system", "--seed"], "--system"),
    ("--xyz", ["--system", "--seed", "--top_p"], None),  # nothing close
    ("--tmp", ["--system", "--top_p"], None),
])
def test_suggestions_are_close_or_absent(typed, known, meant):
    from llama.programs.cli import suggest

    assert suggest(typed, known) == meant


def test_both_spellings_of_a_flag_are_accepted():
    from llama.programs.chat import parser

    opts = parser().parse_args(["--max-seq-len", "64", "--top-p", "0.5", "--num-draft-tokens", "2"])
    assert (opts.max_seq_len, opts.top_p, opts.num_draft_tokens) == (64, 0.5, 2)
    from llama.programs.serve import parse_args

    assert parse_args(["--max-batch-size", "3", "--api-key", "k", "--no-prefix-cache"]).max_batch_size == 3


@pytest.mark.parametrize("program", [["example_text_completion.py"], ["chat.py"]], ids=" ".join)
def test_a_range_comes_from_the_one_parameter_table(program, ckpt):
    proc = run(*program, "--ckpt_dir", str(ckpt), "--tokenizer_path", str(TOKENIZER), "--temperature", "5",
)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --temperature must be in [0, 2], got 5" +
                                                (".0" if program == ["chat.py"] else "")]


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be in [0, 2], got -1"),
    (["--top_p", "2"], "--top_p must be in (0, 1], got 2"),
    (["--max_batch_size", "2"], "--max_batch_size must be at least 4"),
    (["--max_seq_len", "8"], "--max_seq_len 8 leaves no room"),
    (["--max_gen_len", "0"], "--max_gen_len must be a positive integer"),
])
def test_bad_flags_are_refused_before_loading(ckpt, flags, message):
    proc = run("example_text_completion.py", "--ckpt_dir", str(ckpt), "--tokenizer_path", str(TOKENIZER), *flags)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "Loading" not in proc.stdout and "Traceback" not in proc.stderr


def test_an_error_after_loading_has_no_rank_prefix(ckpt, tmp_path):
    script = tmp_path / "after_build.py"
    script.write_text(f"from llama import Llama\nLlama.build({str(ckpt)!r}, {str(TOKENIZER)!r}, 32, 1)\n"
                      "raise RuntimeError('boom')\n")
    proc = run(str(script))
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr
    assert "[rank0]" not in proc.stderr


def test_ctrl_c_while_generating_ends_with_one_line_and_status_130(ckpt):
    # Random weights rarely emit EOS: generation runs until the interrupt comes.
    proc = subprocess.Popen([sys.executable, "example_text_completion.py", "--ckpt_dir", str(ckpt),
                             "--tokenizer_path", str(TOKENIZER), "--max_seq_len", "4096", "--max_gen_len", "4000",
                             "--stream"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "Loaded in" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert "Loaded in" in line
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert stderr.strip() == "interrupted", stderr


def test_under_torchrun_one_rank_speaks(ckpt):
    proc = run_torchrun(ROOT / "example_text_completion.py", ["--ckpt_dir", str(ckpt), "--tokenizer_path",
                                                              str(TOKENIZER), "--top_p", "2"], nproc=2, timeout=120)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("error: --top_p must be in (0, 1]") == 1


def test_demo_notice_once_under_torchrun():
    proc = run_torchrun(ROOT / "example_text_completion.py", ["--max_gen_len", "4"], nproc=2, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("using the bundled demo model") == 1


def test_python_dash_m_llama_lists_and_runs_the_commands(ckpt, tmp_path):
    listing = run("-m", "llama")
    assert listing.returncode == 2 and "chat" in listing.stdout and "reshard" in listing.stdout
    proc = run("-m", "llama", "reshard", str(ckpt), str(tmp_path / "mp2"), "--mp", "2")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "mp2").iterdir()) == ["consolidated.00.pth", "consolidated.01.pth",
                                                                   "params.json"]
    unknown = run("-m", "llama", "serve-it")
    assert unknown.returncode == 2 and "unknown command 'serve-it'" in unknown.stderr


def test_every_command_has_help_and_a_console_script():
    from llama.__main__ import _COMMANDS

    setup = (ROOT / "setup.py").read_text()
    for name, (module, _) in _COMMANDS.items():
        assert f'"llama-{name} = {module}:entry_point"' in setup, name
        proc = program_help("-m", "llama", name)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), (name, proc.stderr[-2000:])


def test_programs_live_apart_from_the_library():
    """Every program is a module of llama/programs/ (installed and run by `python -m llama`); no module of the
    library proper defines `main` or `entry_point` (llama/serve/__main__.py only calls llama/programs/serve.py)."""
    import ast

    from llama.__main__ import _COMMANDS

    assert all(module == f"llama.programs.{name}" for name, (module, _) in _COMMANDS.items())
    for path in sorted((ROOT / "llama").rglob("*.py")):
        relative = path.relative_to(ROOT / "llama").as_posix()
        if relative.startswith("programs/") or relative == "__main__.py":
            continue
        names = {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
        assert not names & {"main", "entry_point"}, f"llama/{relative} defines {names & {'main', 'entry_point'}}"


@pytest.mark.parametrize("command", ["chat", "convert", "quantize", "reshard", "serve"])
def test_usage_names_the_program_as_it_was_run(command):
    """`python -m llama X` says so; an installed `llama-X` script (its argv[0] is the script's path) says
    `llama-X`; neither says `python -m llama.X`."""
    via_module = program_help("-m", "llama", command)
    assert via_module.returncode == 0, via_module.stderr
    assert f"usage: python -m llama {command}" in via_module.stdout, via_module.stdout[:300]
    script = (f"import sys; sys.argv = ['/usr/local/bin/llama-{command}', '--help']; "
              f"from llama.programs.{command} import entry_point; entry_point()")
    installed = run("-c", script)
    assert installed.returncode == 0, installed.stderr
    assert f"usage: llama-{command} " in installed.stdout, installed.stdout[:300]
    assert "python -m" not in installed.stdout.splitlines()[0]


@pytest.mark.parametrize("argv", [["-m", "llama", "chat", "--help"], ["-m", "llama", "quantize", "--help"],
                                  ["-m", "llama", "serve", "--help"], ["-m", "llama"],
                                  ["example_text_completion.py", "--help"]])
def test_help_into_a_closed_pipe_ends_quietly(argv):
    """`llama-chat --help | head -1`: the reader is gone before the help is written. No BrokenPipeError."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started: every write meets a closed pipe
    _, stderr = proc.communicate(timeout=120)
    assert b"Traceback" not in stderr and b"BrokenPipeError" not in stderr, stderr.decode()
    # 141 (as a program ended by SIGPIPE) where the write failed at the end; argparse itself drops a long help
    # that fails as it is written, and the program then ends normally.
    assert proc.returncode in (0, 141, 2 if argv == ["-m", "llama"] else 141), (proc.returncode, stderr.decode())


@pytest.mark.parametrize("argv, message", [
    (["chat", "--max_seq", "64"], "unknown flag --max_seq; did you mean --max_seq_len?"),
    (["reshard", "a", "b", "--mp", "2", "--dtyp", "float32"], "unknown flag --dtyp; did you mean --dtype?"),
    (["quantize", "a", "b", "--mode", "int8", "--group", "64"], "unknown flag --group; did you mean --group_size?"),
])
def test_abbreviated_or_mistyped_flags_are_refused_with_a_suggestion(argv, message):
    proc = run("-m", "llama", *argv)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {message} (--help lists the flags)", proc.stderr


def test_quantize_runs_without_runpys_warning(tmp_path):
    """`python -m llama quantize` (README's spelling) runs the program and prints no RuntimeWarning."""
    new = run_fresh("-m", "llama", "quantize", "--help")
    assert new.returncode == 0 and "RuntimeWarning" not in new.stderr and "--mode" in new.stdout, new.stderr


def test_version_and_distribution_name():
    import llama

    assert llama.__version__.count(".") == 2
    setup = (ROOT / "setup.py").read_text()
    assert 'name="llama2-reference"' in setup
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "llama").rglob("__init__.py")}
    assert all(f'"{name}"' in setup for name in packages), packages  # a wheel must carry every subpackage
