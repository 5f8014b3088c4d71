"""`python -m llama COMMAND ...`: the library's programs under one name (each also installed as llama-COMMAND)."""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

from .programs.cli import exit_with, suggest

# command -> (module, one line of help); each module, in llama/programs/, has main(argv) and entry_point().
_COMMANDS = {
    "chat": ("llama.programs.chat", "chat in the terminal, answers streamed (llama-chat)"),
    "reshard": ("llama.programs.reshard", "rewrite a Meta checkpoint with another shard count (llama-reshard)"),
    "convert": ("llama.programs.convert", "convert between Meta's and Hugging Face's layouts (llama-convert)"),
    "quantize": ("llama.programs.quantize", "write an int8 or int4 weight-only checkpoint (llama-quantize)"),
    "serve": ("llama.programs.serve", "serve an OpenAI-compatible HTTP API (llama-serve; needs the serve extra)"),
    "web": ("llama.programs.web", "serve the API and a web chat page (llama-web; needs the web extra)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: python -m llama COMMAND [--help | flags...]\n\ncommands:")
        for name, (_, text) in _COMMANDS.items():
            print(f"  {name:10} {text}")
        return 0 if argv else 2
    name = argv[0]
    if name not in _COMMANDS:
        close = suggest(name, _COMMANDS)
        hint = f"; did you mean {close}?" if close else ""
        print(f"error: unknown command {name!r}{hint} (commands: {', '.join(_COMMANDS)})", file=sys.stderr)
        return 2
    sys.argv = [f"python -m llama {name}", *argv[1:]]  # the name the program's usage line shows
    importlib.import_module(_COMMANDS[name][0]).entry_point()
    return 0


if __name__ == "__main__":
    exit_with(main)
