"""The code blocks of README.md and of every page in docs/ stay true: every Python block runs (on the demo model);
every command in a bash block names a program that exists with flags that program accepts; and every command that
needs no more than the weights runs as written, in a folder where the docs' checkpoint names point at the demo
model. The links between the pages resolve, README stays a front page, and the layout page names every module."""

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

from forked import install_python, run_python
from helpers import PROGRAM_ENV, ROOT, program_help
from llama import cli
from serve_support import ProcessServer, skip_without

PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
TEXTS = {page.relative_to(ROOT).as_posix(): page.read_text() for page in PAGES}
DEMO = ROOT / "demo" / "fortune-llama"
ENV_PYTHONPATH = {"PYTHONPATH": str(ROOT)}
FRONT_PAGE_LINES = 250


def page_blocks(language: str) -> List[Tuple[str, str]]:
    """Every fenced block of that language in every page: (the page, the block's text)."""
    return [(name, block) for name, text in TEXTS.items()
            for block in re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)]


def blocks(language: str) -> List[str]:
    return [block for _, block in page_blocks(language)]


def block_ids(language: str) -> List[str]:
    seen: dict = {}
    ids = []
    for name, _ in page_blocks(language):
        seen[name] = seen.get(name, -1) + 1
        ids.append(f"{name}:{seen[name]}")
    return ids


@pytest.fixture(scope="module")
def demo_server():
    """`python -m llama.serve` as the docs start it (the demo model), shared by the blocks that are its clients."""
    skip_without("fastapi", "uvicorn", "openai")
    server = ProcessServer([])
    yield server
    server.kill()


@pytest.mark.parametrize("index", range(len(blocks("python"))), ids=block_ids("python"))
def test_python_block_runs(index, tmp_path, request):
    code = blocks("python")[index]
    # The blocks name the released checkpoints; run them on the bundled demo model instead.
    code = re.sub(r'"llama-2-[\w-]*/"', repr(str(DEMO)), code).replace('"tokenizer.model"',
                                                                        repr(str(DEMO / "tokenizer.model")))
    if "http://127.0.0.1:8000" in code:  # a client of `python -m llama.serve`: the demo server, as it starts
        code = code.replace("http://127.0.0.1:8000", request.getfixturevalue("demo_server").url)
    script = tmp_path / "block.py"
    script.write_text(code)
    proc = run_python(str(script), cwd=tmp_path, env=PROGRAM_ENV, timeout=300)  # `python block.py` (tests/forked.py)
    assert proc.returncode == 0, f"{block_ids('python')[index]} failed:\n{code}\n{proc.stderr[-3000:]}"


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
    if program[0] == sys.executable:  # shared with the other files that read the same help
        proc = program_help(*program[1:])
    else:
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
        name = f"llama {rest.pop(0)}" if module == "llama" else module
        text = help_text(sys.executable, "-m", *name.split())
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
        if path.parent.name in ("benchmarks", "scripts") or path.name == "chat.py":  # argparse programs
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
        from llama.__main__ import _COMMANDS

        entry = re.search(rf"{program} = ([\w.]+):", (ROOT / "setup.py").read_text())
        assert entry, f"{line!r}: setup.py installs no {program}"
        command = program[len("llama-"):]
        assert _COMMANDS[command][0] == entry.group(1), f"{program} and python -m llama {command} differ"
        text = help_text(sys.executable, "-m", "llama", command)
        for flag in flags(rest):
            assert flag.split("=")[0] in text, f"{line!r}: {program} has no flag {flag}"


COMMANDS = commands()


@pytest.mark.parametrize("line, words", COMMANDS, ids=[" ".join(w)[:60] for _, w in COMMANDS])
def test_bash_command_names_real_programs_and_flags(line, words):
    check_program(line, words)


def test_the_commands_are_found():
    programs = {words[0] for _, words in COMMANDS}
    assert {"pip", "python", "torchrun", "./download.sh"} <= programs


# --- the commands, run as written ------------------------------------------------------------------------------

# README's checkpoint folders, each standing for the demo model here (the Hugging Face one: the demo converted).
CHECKPOINTS = ["llama-2-7b", "llama-2-7b-chat", "llama-2-13b", "llama-2-13b-chat", "llama-2-70b-chat"]
HF_CHECKPOINTS = ["Llama-2-7b-chat-hf"]
DEMO_PROCESSES = 2  # the demo's 2 KV heads split over 1 or 2 processes


def not_run_here(words: List[str]) -> str:
    """Why a command is not run by test_bash_block_runs_as_written (and where it is run instead), or ""."""
    if words[0] == "pip":
        return "installs packages: CI runs README's install and test command (.ci/run)"
    if any(w.endswith("download.sh") for w in words):
        return "needs Meta's signed link: tests/test_download.py runs download.sh against a fake CDN"
    if "pytest" in words:
        return "the test suite itself"
    if "llama.serve" in words or words[:4] in (["python", "-m", "llama", "serve"], ["python", "-m", "llama", "web"]):
        return "a server runs until stopped: the OpenAI client block runs against one, and tests/test_serve.py"
    if "--nnodes" in words:
        return "needs two machines"
    for flag in ("--nproc_per_node", "--mp"):
        if flag in words and int(words[words.index(flag) + 1]) > DEMO_PROCESSES:
            count = words[words.index(flag) + 1]
            return f"{flag} {count}: the demo model splits over {DEMO_PROCESSES} processes at most"
    return ""


def runnable_commands(block: str) -> List[str]:
    """The block's commands (a `&&` chain split in its parts, a pipeline kept whole) that run here."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out += [part for part in line.split(" && ") if not not_run_here(shlex.split(part)) and part not in out]
    return out


RUNNABLE = [(i, cmds) for i, cmds in enumerate(runnable_commands(b) for b in blocks("bash")) if cmds]
BASH_IDS = block_ids("bash")


@pytest.fixture(scope="module")
def hf_demo(tmp_path_factory):
    from llama.checkpoints.convert import convert

    return convert(DEMO, tmp_path_factory.mktemp("readme") / "hf", to="hf", log=lambda m: None)


@pytest.mark.parametrize("index, cmds", RUNNABLE, ids=[BASH_IDS[i] for i, _ in RUNNABLE])
def test_bash_block_runs_as_written(index, cmds, tmp_path, hf_demo):
    """The block's commands, in order, in a folder holding README's names: its checkpoint folders (the demo
    model), tokenizer.model and the scripts; `python` and `torchrun` are this interpreter's."""
    for name in CHECKPOINTS:
        (tmp_path / name).symlink_to(DEMO, target_is_directory=True)
    for name in HF_CHECKPOINTS:
        (tmp_path / name).symlink_to(hf_demo, target_is_directory=True)
    (tmp_path / "tokenizer.model").symlink_to(DEMO / "tokenizer.model")
    for script in ("example_text_completion.py", "example_chat_completion.py", "chat.py"):
        (tmp_path / script).symlink_to(ROOT / script)
    bindir = tmp_path / ".bin"
    bindir.mkdir()
    # `python` runs this interpreter's programs as forks of a process that has imported torch (tests/forked.py),
    # and torchrun is that `python -m torch.distributed.run` (its workers are new interpreters). Not a symlink: a
    # symlink to a virtualenv's python runs the base interpreter (venv detection reads pyvenv.cfg beside the path
    # invoked), which has none of the venv's packages.
    base = {**__import__("os").environ, **ENV_PYTHONPATH, "OMP_NUM_THREADS": "1"}
    python = shlex.quote(str(install_python(bindir, base)))
    (bindir / "torchrun").write_text(f"#!/bin/sh\nexec {python} -m torch.distributed.run \"$@\"\n")
    (bindir / "torchrun").chmod(0o755)
    env = {**base, "PATH": f"{bindir}:{__import__('os').environ['PATH']}"}
    for cmd in cmds:
        proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"{BASH_IDS[index]}: {cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{BASH_IDS[index]}: {cmd}\n{proc.stderr[-3000:]}"


def test_every_command_is_run_or_says_where_it_is():
    """Each bash command either runs in test_bash_block_runs_as_written or has a reason, and the reasons
    cover only what cannot run here."""
    ran = {c for _, cmds in RUNNABLE for c in cmds}
    assert any("example_chat_completion.py" in c for c in ran) and any("convert" in c for c in ran)
    assert any("chat.py" in c and "printf" in c for c in ran) and any("quantize" in c for c in ran)


# --- the pages themselves ---------------------------------------------------------------------------------------


def test_readme_is_a_front_page_that_links_every_docs_page():
    readme = TEXTS["README.md"]
    assert len(readme.splitlines()) <= FRONT_PAGE_LINES, f"README.md has {len(readme.splitlines())} lines"
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("name", list(TEXTS))
def test_relative_links_resolve(name):
    """Every link to a file of the repository, from README or a docs page, names a file that exists."""
    page = ROOT / name
    text = re.sub(r"```.*?```", "", TEXTS[name], flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{name}: the link {target} leads nowhere"


def test_the_layout_page_names_every_module():
    """docs/architecture.md ("How the code is laid out") stays true: every module and C source of the package is
    named there, and every file it names exists."""
    layout = TEXTS["docs/architecture.md"]
    package = ROOT / "llama"
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".c", ".h") and path.name != "__init__.py" and "__pycache__" not in path.parts:
            assert path.name in layout or re.search(rf"\b{path.stem}\b", layout), \
                f"docs/architecture.md does not name {path.relative_to(ROOT)}"
    named = set(re.findall(r"\b([\w]+\.(?:py|c|h))\b", layout))
    existing = {p.name for p in ROOT.rglob("*") if p.suffix in (".py", ".c", ".h") and ".git" not in p.parts}
    assert not named - existing, f"docs/architecture.md names files that do not exist: {sorted(named - existing)}"
