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
