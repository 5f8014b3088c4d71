"""Ctrl-C from a program's first moment: one line, `interrupted`, and exit status 130.

A program's imports (torch above all) take seconds. Python's own SIGINT handling there prints a traceback of
the import machinery, or loses the interrupt where a library catches every exception while it loads. So
`llama/__init__.py` calls `install` first thing when the process is one of the programs (`python -m llama...`,
an installed `llama-*` script, or a script at the top of a clone: example_*.py, chat.py), before anything
imports torch: until the program's work begins, Ctrl-C ends the process at once. `cli.guarded`, where the
work begins, calls `hand_back`: from then on Ctrl-C raises KeyboardInterrupt, so that the work stops cleanly
(temporary files removed, an answer stopped) and `guarded` prints the same one line. Standard library only:
it runs before torch is imported.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

STATUS = 130  # 128 + SIGINT, what a shell reports for a process that Ctrl-C ended
CLONE_SCRIPTS = ("example_text_completion.py", "example_chat_completion.py", "chat.py")  # at a clone's top


def is_program_start() -> bool:
    """Whether this process is starting one of the library's programs (and not a library user's code)."""
    if sys.argv[:1] == ["-m"]:  # `python -m MODULE` while runpy imports MODULE's packages: is it one of ours?
        line = list(getattr(sys, "orig_argv", []))
        module = line[line.index("-m") + 1] if "-m" in line[:-1] else "llama"
        return module == "llama" or module.startswith("llama.")
    if os.path.basename(sys.argv[0] if sys.argv else "").startswith("llama-"):  # an installed console script
        return True
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if not main:
        return False
    main = os.path.realpath(main)  # a link to the script counts
    clone = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    return os.path.dirname(main) == clone and os.path.basename(main) in CLONE_SCRIPTS


def _exit_at_once(signum, frame) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun every worker gets it: rank 0 speaks
        try:
            os.write(2, b"\ninterrupted\n")
        except OSError:
            pass
    os._exit(STATUS)


def install() -> None:
    """Ctrl-C ends the process at once with one line and status 130 (until `hand_back`)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_at_once)


def hand_back() -> None:
    """The program's work begins: Ctrl-C raises KeyboardInterrupt again, for the program to stop cleanly."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _exit_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)
