"""README's code blocks stay true: every Python block runs (on the demo model), and every command in a bash
block names a program that exists with flags that program accepts."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import pytest

from helpers import ROOT
from llama import cli
from serve_support import ProcessServer, skip_without

README = (ROOT / "README.md").read_text()
DEMO = ROOT / "demo" / "fortune-llama"
ENV_PYTHONPATH = {"PYTHONPATH": str(ROOT)}


def blocks(language: str) -> List[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, tmp_path):
    code = blocks("python")[index]
    # The blocks name the released checkpoints; run them on the bundled demo model instead.
    code = re.sub(r'"llama-2-[\w-]*/"', repr(str(DEMO)), code).replace('"tokenizer.model"',
                                                                        repr(str(DEMO / "tokenizer.model")))
    server = None
    if "http://127.0.0.1:8000" in code:  # a client of `python -m llama.serve`: serve the demo model for it
        skip_without("fastapi", "uvicorn", "openai")
        named = re.search(r'model="([^"]+)"', code)
        server = ProcessServer(["--model", named.group(1)] if named else [])
        code = code.replace("http://127.0.0.1:8000", server.url)
    script = tmp_path / "block.py"
    script.write_text(code)
    try:
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env={**__import__("os").environ, **ENV_PYTHONPATH, "OMP_NUM_THREADS": "1"})
    finally:
        if server is not None:
            server.kill()
    assert proc.returncode == 0, f"README python block {index} failed:\n{code}\n{proc.stderr[-3000:]}"


def commands() -> List[Tuple[str, List[str]]]:
    """Every simple command of every bash block: (the line it came from, its words)."""
    found = []
    for block in blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            part: List[str] = []
            for word in words + ["&&"]:
                if word in ("&&", "|", "||", ";"):
                    if part:
                        found.append((line, part))
                    part = []
                else:
                    part.append(word)
    return found


def flags(words: List[str]) -> List[str]:
    return [w for w in words if w.startswith("--")]


@lru_cache(maxsize=None)
def help_text(*program: str) -> str:
    proc = subprocess.run(list(program) + ["--help"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**__import__("os").environ, **ENV_PYTHONPATH})
    assert proc.returncode == 0, f"{program} --help failed: {proc.stderr[-2000:]}"
    return proc.stdout


def check_fire_script(path: Path, words: List[str]) -> None:
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cli._check_flags(module.main, flags(words))


def check_program(line: str, words: List[str]) -> None:
    """Raise if the command's program is missing or does not know one of its flags."""
    program, rest = words[0], words[1:]
    if program == "torchrun" and "-m" in rest:  # torchrun [its flags] -m MODULE [flags]: check the module's
        program, rest = "python", rest[rest.index("-m"):]
    if program in ("python", "python3") and rest[:1] == ["-m"]:
        module, rest = rest[1], rest[2:]
        if module == "pytest" or module == "llama" and not rest:
            return
        name = f"llama.{rest.pop(0)}" if module == "llama" else module
        text = help_text(sys.executable, "-m", name)
        for flag in flags(rest):
            assert flag.split("=")[0] in text, f"{line!r}: {name} has no flag {flag}"
        return
    if program == "torchrun":
        scripts = [i for i, w in enumerate(rest) if w.endswith(".py")]
        assert scripts, f"{line!r}: torchrun without a script"
        program, rest = rest[scripts[0]], rest[scripts[0] + 1:]
    elif program in ("python", "python3"):
        program, rest = rest[0], rest[1:]
    if program.endswith(".py"):
        path = ROOT / program
        assert path.is_file(), f"{line!r}: {program} does not exist"
        if path.parent.name in ("benchmarks", "scripts"):
            text = help_text(sys.executable, str(path))
            for flag in flags(rest):
                assert flag.split("=")[0] in text, f"{line!r}: {program} has no flag {flag}"
        else:
            check_fire_script(path, rest)
    elif program == "./download.sh":
        text = help_text("bash", str(ROOT / "download.sh"))
        for flag in flags(rest):
            assert flag.split("=")[0] in text, f"{line!r}: download.sh has no flag {flag}"
    elif program.startswith("llama-"):
        entry = re.search(rf"{program} = ([\w.]+):", (ROOT / "setup.py").read_text())
        assert entry, f"{line!r}: setup.py installs no {program}"
        text = help_text(sys.executable, "-m", entry.group(1))
        for flag in flags(rest):
            assert flag.split("=")[0] in text, f"{line!r}: {program} has no flag {flag}"


COMMANDS = commands()


@pytest.mark.parametrize("line, words", COMMANDS, ids=[" ".join(w)[:60] for _, w in COMMANDS])
def test_bash_command_names_real_programs_and_flags(line, words):
    check_program(line, words)


def test_the_commands_are_found():
    programs = {words[0] for _, words in COMMANDS}
    assert {"pip", "python", "torchrun", "./download.sh"} <= programs
