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


# The wings from the bottom up: a module may import its own wing and the wings below it, never one above. The
# package's own __init__ (the public names), __main__ and web.py (shims that call a program) sit on top.
LAYERS = ["cpu", "quant", "model", "tokenizers", "tokenizer", "engine", "families", "checkpoints", "builder",
          "token_generator", "generation", "serve", "programs", "__init__", "__main__", "web"]
SHIMS = {"serve/__main__.py"}  # `python -m llama.serve` runs programs/serve.py, and does nothing else


def _wing(module: str) -> str:
    """llama.engine.params -> engine; llama.generation -> generation; llama -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _runtime_imports(relative: str, tree) -> set:
    """What a module imports when it runs, at any depth (imports under `if TYPE_CHECKING:` are only for types)."""
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    return {name for name in _imported(relative, tree) if name == "llama" or name.startswith("llama.")}


def test_imports_point_down_the_wings_and_never_circle():
    import importlib.util

    modules = {}
    for relative, _, tree in _modules():
        name = "llama." + relative[:-3].replace("/", ".")
        name = name[:-len(".__init__")] if name.endswith(".__init__") else name
        modules[name] = (relative, {n for n in _runtime_imports(relative, tree) if n != name})
    assert {_wing(name) for name in modules} <= set(LAYERS), "a new wing: give it its place in LAYERS"
    graph = {}
    for name, (relative, imported) in modules.items():
        # a name may be a module or a name inside one: keep the longest prefix that is a module of ours
        targets = {next(p for p in (t.rsplit(".", k)[0] for k in range(t.count(".") + 1)) if p in modules)
                   for t in imported}
        # a module's own packages are set up before it by Python itself: `from . import x` is an arrow to x only
        graph[name] = {t for t in targets if not name.startswith(t + ".") and t != name}
        if relative in SHIMS:
            continue
        upward = sorted(t for t in graph[name]
                        if LAYERS.index(_wing(t)) > LAYERS.index(_wing(name)))
        assert not upward, f"llama/{relative} imports a wing above its own: {upward}"
    # no circle between modules: a depth-first walk finds no edge back to a module on its path
    state = {}

    def walk(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert importlib.util.find_spec("llama.engine.lora_slots"), "the old path of lora_slots stays importable"
