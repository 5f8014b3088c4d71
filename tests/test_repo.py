"""The repository keeps its promises: CI runs README's test command; the public names exist."""

import re

import llama
from helpers import ROOT


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- TEST-COMMAND[^>]*-->\s*```bash\n(.+?)\n```", text)
    assert match, "README.md lost its marked test command"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert readme_test_command() in ci_lines


def test_public_surface_matches_the_released_reference():
    for name in ["Llama", "Dialog", "Message", "Tokenizer", "ModelArgs", "Transformer", "ChatFormat"]:
        assert hasattr(llama, name), name
    assert set(llama.__all__) >= {"Llama", "Dialog", "Message", "Tokenizer", "ModelArgs", "Transformer",
                                  "ChatFormat"}


# --- the house's shape (issue 34): small rooms, arrows that point down ------------------------------------------

MAX_MODULE_LINES, MAX_CLASS_LINES = 400, 250
# Rooms still too big, each to be split; the lists only shrink (an entry that fits again fails, to be removed).
BIG_MODULES: set[str] = set()
BIG_CLASSES: set[str] = set()


def _modules():
    """(path relative to llama/, parsed module) for every module of the library."""
    import ast

    for path in sorted((ROOT / "llama").rglob("*.py")):
        yield path.relative_to(ROOT / "llama").as_posix(), path, ast.parse(path.read_text())


def _imported(relative: str, tree) -> set:
    """The absolute names of the modules a module imports (relative imports resolved against its package)."""
    import ast

    package = ["llama", *relative.split("/")[:-1]]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_over_400_lines_and_no_class_over_250():
    import ast

    big_modules, big_classes = set(), set()
    for relative, path, tree in _modules():
        if len(path.read_text().splitlines()) > MAX_MODULE_LINES:
            big_modules.add(relative)
        big_classes.update(f"{relative}:{node.name}" for node in ast.walk(tree)
                           if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES)
    assert big_modules <= BIG_MODULES, f"modules over {MAX_MODULE_LINES} lines: {sorted(big_modules - BIG_MODULES)}"
    assert big_classes <= BIG_CLASSES, f"classes over {MAX_CLASS_LINES} lines: {sorted(big_classes - BIG_CLASSES)}"
    assert big_modules == BIG_MODULES, f"now small enough, remove from BIG_MODULES: {sorted(BIG_MODULES - big_modules)}"
    assert big_classes == BIG_CLASSES, f"now small enough, remove from BIG_CLASSES: {sorted(BIG_CLASSES - big_classes)}"


def test_no_c_file_over_400_lines():
    """The C kernels are rooms too (llama/cpu/csrc): every .c and .h file under llama/ at most 400 lines."""
    sources = sorted([*(ROOT / "llama").rglob("*.c"), *(ROOT / "llama").rglob("*.h")])
    assert sources, "no C sources found under llama/"
    big = {path.relative_to(ROOT).as_posix(): n for path in sources
           if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not big, f"C files over {MAX_MODULE_LINES} lines: {big}"


def test_serve_never_imports_the_programs():
    """llama/serve/ is a library wing: the programs (llama/programs/) sit above it, never below. Its __main__.py,
    the shim that `python -m llama.serve` runs, only calls the program."""
    for relative, _, tree in _modules():
        if relative.startswith("serve/") and relative != "serve/__main__.py":
            upward = sorted(n for n in _imported(relative, tree) if n == "llama.programs" or
                            n.startswith("llama.programs."))
            assert not upward, f"llama/{relative} imports {upward}"
