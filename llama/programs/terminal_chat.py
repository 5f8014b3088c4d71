"""The terminal chat with a Llama chat model (Llama 2, Code Llama Instruct, Llama 3.x): answers appear token by
token. The program that runs it is llama/programs/chat.py:

    torchrun --nproc_per_node MP chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    python chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model   # one process
    python chat.py                                                                # the bundled demo model
    llama-chat ...  /  python -m llama chat ...                                   # the same, once installed

Type a message and press Enter. Commands: /help, /reset, /system [TEXT], /quit (or Ctrl-D). Ctrl-C while an
answer streams stops it and the conversation goes on. A message of several lines ends its lines with a
backslash, or sits between lines of triple quotes (`read_message`). Piped stdin works too (one message or
command per line, with the same conventions; end of input leaves), so sessions can be scripted.

Under torchrun, rank 0 reads the terminal and sends every line to the other ranks; all ranks generate in step
and only rank 0 prints. torchrun starts its workers in their own sessions, so the terminal's Ctrl-C reaches
torchrun, not the workers: while an answer streams, rank 0 therefore reads Ctrl-C as a key itself (the
terminal's signal keys are off for that time) and stops the answer on every rank at the same chunk. Ctrl-C
at the prompt goes to torchrun, which ends the whole session; leave with /quit or Ctrl-D instead.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from typing import Callable, Iterator, List, Optional, Sequence, TextIO

from ..families.chat_format import Message
from ..engine.params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from ..model.distributed import Broadcast
from ..generation import Llama

try:  # line editing and history at the prompt, where the platform has it
    import readline
except ImportError:  # pragma: no cover - Windows
    readline = None

_HELP = """Commands:
  /help          this list
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt; /system alone removes it
  /quit          leave (so do /exit, /bye and Ctrl-D)
Ctrl-C while an answer streams stops it; the conversation goes on.
Several lines as one message (a pasted code block, say): end a line with \\ to go on to the next, or open a
block with a line that starts with \"\"\" and close it with a line that ends with \"\"\". A paste that the
terminal brackets arrives whole by itself."""

_QUIT_COMMANDS = ("/quit", "/exit", "/bye")
SHIELD_CONTEXT = 1024  # the shield's prompt adds its instructions and categories to the conversation
SHIELD_VERDICT = 32  # tokens of the shield's answer: 'unsafe' and the category codes


# --- rank 0's terminal -----------------------------------------------------------------------------------


class _Console:
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
        except _Ended:
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
            raise _Ended from None
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
            raise _Ended from None
        finally:
            if readline is not None:
                readline.set_startup_hook(None)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """While an answer streams, Ctrl-C sets `stop`: as a signal (on_sigint) or, where the terminal's
        signals do not reach this process, as a key."""
        self.stop.clear()
        watcher = _KeyWatcher(self) if self.watch_keys else None
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


class _Ended(Exception):
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


class _KeyWatcher:
    """Terminal keys read one by one while an answer streams (its signal keys off): Ctrl-C stops the answer,
    a second Ctrl-C a second later ends the session (for a stuck run), other keys wait for the next prompt."""

    def __init__(self, console: _Console) -> None:
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


class _SilentConsole:
    """What ranks other than 0 hold: they print nothing and never read the terminal."""

    stop = threading.Event()

    def write(self, text: str) -> None:
        pass

    def restore_tty(self) -> None:
        pass

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        yield


def _leave_on_sigint(console, signum, frame) -> None:
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


# --- the conversation ------------------------------------------------------------------------------------


def _answer_room(max_seq_len: int, max_gen_len: Optional[int]) -> int:
    """The longest answer, kept free in the context: max_gen_len, by default a quarter of max_seq_len."""
    if max_gen_len is None:
        return max(1, max_seq_len // 4)
    if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or not 0 < max_gen_len < max_seq_len:
        raise ValueError(f"max_gen_len must be between 1 and max_seq_len - 1 ({max_seq_len - 1}), got "
                         f"{max_gen_len!r}: the prompt needs room too")
    return max_gen_len


class ChatSession:
    """The dialog, the commands and the streamed answers. Every rank runs one, fed the same lines."""

    def __init__(self, generator: Llama, console, channel: Broadcast, system: Optional[str] = None,
                 temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                 max_gen_len: Optional[int] = None, shield: Optional[Llama] = None) -> None:
        self.generator = generator
        self.shield = shield  # a Llama Guard model that checks each message and each answer
        self.formatter = generator.formatter  # the family's chat format: its tags may not appear in messages
        self.tags = self.formatter.tags_text()
        self.console = console
        self.channel = channel
        self.temperature = temperature
        self.top_p = top_p
        self.max_seq_len = generator.max_seq_len
        max_gen_len = _answer_room(self.max_seq_len, max_gen_len)
        self.max_gen_len = max_gen_len  # also the room kept free for each answer
        self.system = system.strip() if system and system.strip() else None
        if self.system is not None and self.formatter.contains_tags(self.system):
            raise ValueError(f"the system prompt may not contain {self.tags}")
        self.history: List[Message] = []  # user, assistant, user, assistant...

    def handle(self, line: str) -> bool:
        """One line from the user: a command or a message. False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.answer(text)
        return True

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in _QUIT_COMMANDS:
            return False
        if name == "/help":
            self.console.write(_HELP + "\n")
        elif name == "/reset":
            self.history = []
            self.console.write("(conversation cleared)\n")
        elif name == "/system":
            if not arg:
                self.system = None
                self.console.write("(system prompt removed)\n")
            elif self.formatter.contains_tags(arg):
                self.console.write(f"(system prompt not changed: {self.tags} are not allowed in it)\n")
            else:
                self.system = arg
                self.console.write("(system prompt set)\n")
        else:
            self.console.write(f"(unknown command {name}; /help lists the commands)\n")
        return True

    def _dialog(self, turns: Sequence[Message]) -> List[Message]:
        system: List[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return system + list(turns)

    def _prompt_len(self, turns: Sequence[Message]) -> int:
        return self.generator.dialog_length(self._dialog(turns))

    def fit(self, text: str) -> Optional[List[Message]]:
        """The dialog to answer, oldest turns dropped until the prompt leaves room for an answer; None (and a
        notice) when even the system prompt and this message alone leave none."""
        user: Message = {"role": "user", "content": text}
        limit = self.max_seq_len - self.max_gen_len
        alone = self._prompt_len([user])
        if alone > limit:
            self.console.write(f"(message not sent: it makes a {alone}-token prompt"
                               f"{' with the system prompt' if self.system else ''}, but max_seq_len "
                               f"{self.max_seq_len} leaves {limit} tokens for prompts after room for a "
                               f"{self.max_gen_len}-token answer)\n")
            return None
        dropped = 0
        while self._prompt_len(self.history + [user]) > limit:
            self.history = self.history[2:]
            dropped += 1
        if dropped:
            self.console.write(f"(history too long for max_seq_len {self.max_seq_len}: dropped the oldest "
                               f"{dropped} turn(s))\n")
        return self._dialog(self.history + [user])

    def answer(self, text: str) -> None:
        if self.formatter.contains_tags(text):
            self.console.write(f"(message not sent: {self.tags} are not allowed in a message)\n")
            return
        dialog = self.fit(text)
        if dialog is None:
            return
        user: Message = {"role": "user", "content": text}
        if not self._shielded(self.history + [user], "message not sent: the shield rates it"):
            return
        chunks: List[str] = []
        stopped = False
        stream = self.generator.stream_chat_completion(dialog, temperature=self.temperature, top_p=self.top_p,
                                                       max_gen_len=self.max_gen_len)
        with self.console.answering():
            try:
                for chunk in stream:
                    chunks.append(chunk)
                    self.console.write(chunk)
                    # Every rank yields the same chunks, so every rank asks here, and all stop at this chunk.
                    if self.channel.share(self.console.stop.is_set()):
                        stopped = True
                        break
            finally:
                stream.close()
        self.console.write(" [stopped]\n" if stopped else "\n")
        answer: Message = {"role": "assistant", "content": "".join(chunks)}
        if not self._shielded(self.history + [user, answer], "answer withdrawn: the shield rates it"):
            return  # neither the message nor the answer stays in the conversation
        self.history += [user, answer]

    def _shielded(self, turns: Sequence[Message], refusal: str) -> bool:
        """True when there is no shield or it rates the conversation's last turn safe; else says why not."""
        if self.shield is None:
            return True
        guard, turns = self.shield, list(turns)
        room = guard.max_seq_len - SHIELD_VERDICT
        while len(turns) > 2 and len(guard.family.encode_prompt(guard.tokenizer, turns)) > room:
            turns = turns[2:]  # the oldest exchange goes, as for the model's own context
        if len(guard.family.encode_prompt(guard.tokenizer, turns)) > room:
            self.console.write(f"({refusal} too long to check)\n")
            return False
        verdict = guard.moderate(turns, max_gen_len=SHIELD_VERDICT)
        if verdict.safe:
            return True
        self.console.write(f"({refusal} {verdict.describe()})\n")
        return False

    def run(self, read_line) -> None:
        """Until /quit or the end of input: rank 0 reads, every rank handles the same line."""
        while True:
            line = self.channel.share(read_line() if self.channel.rank == 0 else None)
            if line is None or not self.handle(line):
                return
