"""Rank 0's terminal for the terminal chat (llama/programs/terminal_chat.py): reading messages, printing
answers, and Ctrl-C while an answer streams.

A message of several lines ends its lines with a backslash, or sits between lines of triple quotes
(`read_message`). Piped stdin works too (one message or command per line, with the same conventions; end of
input leaves), so sessions can be scripted.

Under torchrun only rank 0 reads the terminal (the others hold a `SilentConsole`). torchrun starts its workers
in their own sessions, so the terminal's Ctrl-C reaches torchrun, not the workers: while an answer streams,
rank 0 therefore reads Ctrl-C as a key itself (`KeyWatcher`: the terminal's signal keys are off for that time)
and the chat stops the answer on every rank at the same chunk. Ctrl-C at the prompt goes to torchrun, which
ends the whole session (`leave_on_sigint`); leave with /quit or Ctrl-D instead.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from typing import Callable, Iterator, Optional, TextIO

try:  # line editing and history at the prompt, where the platform has it
    import readline
except ImportError:  # pragma: no cover - Windows
    readline = None


class Console:
    """Reads lines and prints answers (rank 0); learns of Ctrl-C while an answer streams."""

    def __init__(self, stdin: TextIO, stdout: TextIO) -> None:
        self.stdin, self.out = stdin, stdout
        self.interactive = _isatty(stdin)
        self.stop = threading.Event()
        self.at_prompt = False
        self.typeahead = ""
        # A worker that torchrun started in a session of its own gets no SIGINT from the terminal: it must read
        # Ctrl-C as a key. A process in the terminal's foreground group (plain python) gets the signal.
        self.watch_keys = self.interactive and not _in_foreground(stdin.fileno())
        self._saved_tty = _get_tty(stdin.fileno()) if self.interactive else None
        if self.watch_keys:
            signal.signal(signal.SIGTERM, self._on_sigterm)  # torchrun's way to end workers: fix the tty first

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def on_sigint(self, signum, frame) -> None:
        """One process, in the terminal's foreground: Ctrl-C interrupts the prompt, else stops the answer."""
        if self.at_prompt:
            raise KeyboardInterrupt
        self.stop.set()

    def read_line(self) -> Optional[str]:
        """The next message (see `read_message`); None at the end of input (Ctrl-D, closed pipe). Ctrl-C at the
        prompt ends the session as interrupted (one line, status 130), typed or piped, as at any other moment."""
        self.at_prompt = True
        try:
            return read_message(self._read_one)
        except Ended:
            raise KeyboardInterrupt from None  # the program's one line, `interrupted`, and status 130
        finally:
            self.at_prompt = False

    def _read_one(self, prompt: str) -> Optional[str]:
        return self._read_tty(prompt) if self.interactive else self._read_pipe(prompt)

    def _read_pipe(self, prompt: str) -> Optional[str]:
        self.write(prompt)
        try:
            line = self.stdin.readline()
        except KeyboardInterrupt:
            raise Ended from None
        if not line:
            self.write("\n")
            return None
        line = line.rstrip("\r\n")
        self.write(line + "\n")  # echoed, so a transcript shows what was asked
        return line

    def _read_tty(self, prompt: str) -> Optional[str]:
        text, self.typeahead = self.typeahead, ""
        if readline is not None and text:
            readline.set_startup_hook(lambda: readline.insert_text(text))
        try:
            return input(prompt)
        except EOFError:
            self.write("\n")
            return None
        except KeyboardInterrupt:
            self.write("\n")
            raise Ended from None
        finally:
            if readline is not None:
                readline.set_startup_hook(None)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """While an answer streams, Ctrl-C sets `stop`: as a signal (on_sigint) or, where the terminal's
        signals do not reach this process, as a key."""
        self.stop.clear()
        watcher = KeyWatcher(self) if self.watch_keys else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.close()

    def restore_tty(self) -> None:
        _set_tty(self.stdin.fileno(), self._saved_tty)

    def _on_sigterm(self, signum, frame) -> None:
        self.restore_tty()
        os._exit(128 + signum)


class Ended(Exception):
    """Ctrl-C at the prompt: the session ends as interrupted (status 130)."""


BLOCK = '"""'
PROMPT, MORE = "> ", "... "


def read_message(read_one: Callable[[str], Optional[str]]) -> Optional[str]:
    """One message from lines read by `read_one(prompt)` (None at the end of input), so that text of several
    lines (a pasted code block) is sent as one message:

    - a line ending in a backslash continues on the next line (the backslash is dropped, the line break kept);
    - a line starting with triple quotes (\"\"\") opens a block: every line up to the next line that ends with
      triple quotes is one message, blank lines and backslashes as they are (text beside the quotes counts);
    - where the terminal and readline bracket a paste (readline 8.1 and later), a pasted text of several lines
      arrives as one line already and is sent whole.

    None at the end of input before any text; a block or continuation cut short by it is sent as it stands.
    """
    line = read_one(PROMPT)
    if line is None:
        return None
    if line.lstrip().startswith(BLOCK):
        rest = line.lstrip()[len(BLOCK):]
        if rest.rstrip().endswith(BLOCK):  # \"\"\"one line\"\"\"
            return rest.rstrip()[:-len(BLOCK)]
        lines = [rest] if rest.strip() else []
        while True:
            line = read_one(MORE)
            if line is None:
                break
            if line.rstrip().endswith(BLOCK):
                last = line.rstrip()[:-len(BLOCK)]
                if last.strip():
                    lines.append(last)
                break
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line is not None and line.endswith("\\"):
        lines.append(line[:-1])
        line = read_one(MORE)
    if line is not None:
        lines.append(line)
    return "\n".join(lines)


class KeyWatcher:
    """Terminal keys read one by one while an answer streams (its signal keys off): Ctrl-C stops the answer,
    a second Ctrl-C a second later ends the session (for a stuck run), other keys wait for the next prompt."""

    def __init__(self, console: Console) -> None:
        import termios

        self.console = console
        self.fd = console.stdin.fileno()
        self.closed = threading.Event()
        self.first_stop = 0.0
        self.pending = b""
        attrs = termios.tcgetattr(self.fd)
        attrs[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG)
        attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        self.thread = threading.Thread(target=self._run, name="chat-keys", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.05)
                data = os.read(self.fd, 256) if ready else b""
            except OSError:
                return
            for byte in data:
                if byte != 3:
                    self.pending += bytes([byte])
                elif not self.console.stop.is_set():
                    self.first_stop = time.monotonic()
                    self.console.stop.set()
                elif time.monotonic() - self.first_stop > 1.0:
                    self._force_quit()

    def _force_quit(self) -> None:
        self.console.restore_tty()
        self.console.write("\n(the answer does not stop: ending the session)\n")
        if "TORCHELASTIC_RUN_ID" in os.environ:
            os.kill(os.getppid(), signal.SIGINT)  # torchrun ends every worker
        else:
            os._exit(130)

    def close(self) -> None:
        self.closed.set()
        self.thread.join()
        self.console.restore_tty()
        typed = self.pending.decode("utf-8", errors="ignore")
        self.console.typeahead += "".join(c for c in typed if c.isprintable())


class SilentConsole:
    """What ranks other than 0 hold: they print nothing and never read the terminal."""

    stop = threading.Event()

    def write(self, text: str) -> None:
        pass

    def restore_tty(self) -> None:
        pass

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        yield


def leave_on_sigint(console, signum, frame) -> None:
    """A launcher's worker gets SIGINT when the launcher got it (torchrun: Ctrl-C at the prompt) and is
    ending the run: leave at once, quietly, on every rank."""
    if console is not None:
        console.restore_tty()
        console.write("\n(torchrun got Ctrl-C and ends the session; at the prompt, /quit or Ctrl-D leave "
                      "without it)\n")
    os._exit(128 + signum)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _in_foreground(fd: int) -> bool:
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:  # not our controlling terminal (a new session, as torchrun's workers are)
        return False


def _get_tty(fd: int):
    try:
        import termios

        return termios.tcgetattr(fd)
    except (ImportError, OSError):
        return None


def _set_tty(fd: int, attrs) -> None:
    if attrs is None:
        return
    try:
        import termios

        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except (ImportError, OSError):
        pass
