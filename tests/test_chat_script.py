"""chat.py: the conversation logic on a fake generator, then whole sessions through piped stdin and a
pseudo-terminal, in one process and under `torchrun --nproc_per_node 2` on CPU.

The sessions run a scripted checkpoint (see test_streaming.scripted_checkpoint) that answers every message
with "Hello 世界😀!" (emoji in byte-fallback tokens), or talks forever for the Ctrl-C tests.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Iterator, List

import pytest

from helpers import ROOT, TOKENIZER
from llama import Tokenizer
from llama.families.chat_format import ChatFormat
from test_streaming import EOS, GREETING, HELLO, WORLD, scripted_checkpoint

from llama import chat
from llama.programs.console import Console
from llama.model.distributed import Broadcast

ANSWER = "Hello 世界😀!"
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


# --- the conversation logic, on a fake generator ---------------------------------------------------------


class FakeGenerator:
    """What ChatSession uses of Llama: max_seq_len, dialog_length and stream_chat_completion."""

    def __init__(self, max_seq_len: int, chunks=("Hi", " there", "!")):
        self.formatter = ChatFormat(Tokenizer(TOKENIZER))
        self.max_seq_len = max_seq_len
        self.chunks = chunks
        self.dialogs: List[list] = []
        self.closed = 0

    def dialog_length(self, dialog) -> int:
        return len(self.formatter.encode_dialog_prompt(dialog))

    def stream_chat_completion(self, dialog, temperature, top_p, max_gen_len):
        self.dialogs.append([dict(m) for m in dialog])
        try:
            yield from self.chunks
        finally:
            self.closed += 1


class RecordingConsole:
    def __init__(self):
        self.text = ""
        self.stop = threading.Event()
        self.stop_after = None  # set stop once this many chunks were written

    def write(self, text: str) -> None:
        self.text += text
        if self.stop_after is not None and not text.startswith("("):
            self.stop_after -= 1
            if self.stop_after == 0:
                self.stop.set()

    @contextlib.contextmanager
    def answering(self):
        self.stop.clear()
        yield


def session(max_seq_len=96, max_gen_len=16, system=None, **kw):
    gen = FakeGenerator(max_seq_len, **kw)
    console = RecordingConsole()
    return chat.ChatSession(gen, console, Broadcast(), system=system, temperature=0, max_gen_len=max_gen_len), gen


def test_turns_accumulate_and_answers_are_kept():
    s, gen = session(max_seq_len=512)
    assert s.handle("first") and s.handle("second")
    assert gen.dialogs[1] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "Hi there!"},
                              {"role": "user", "content": "second"}]
    assert s.console.text == "Hi there!\nHi there!\n"
    assert gen.closed == 2


def test_overflow_drops_oldest_turns_and_keeps_the_system_prompt():
    s, gen = session(max_seq_len=96, max_gen_len=16, system="Be brief.")
    for i in range(6):
        s.handle(f"message number {i} with a few more words")
    notices = [line for line in s.console.text.splitlines() if line.startswith("(history too long")]
    assert notices and all("dropped the oldest" in n for n in notices)
    limit = 96 - 16
    for dialog in gen.dialogs:
        assert dialog[0] == {"role": "system", "content": "Be brief."}
        assert len(gen.formatter.encode_dialog_prompt(dialog)) <= limit
    assert gen.dialogs[-1][-1]["content"] == "message number 5 with a few more words"
    assert len(gen.dialogs[-1]) < 2 + 2 * 5  # some turns are gone


def test_message_too_long_alone_is_skipped():
    s, gen = session(max_seq_len=64, max_gen_len=16)
    s.handle("short")
    s.handle("word " * 80)
    assert "(message not sent: it makes a" in s.console.text
    assert len(gen.dialogs) == 1 and len(s.history) == 2  # the history is left as it was
    s.handle("short again")
    assert len(gen.dialogs) == 2


def test_commands():
    s, gen = session(max_seq_len=512)
    s.handle("hello")
    assert s.handle("/reset") and s.history == []
    assert s.handle("/system   Answer in French.  ") and s.system == "Answer in French."
    s.handle("bonjour")
    assert gen.dialogs[-1][0] == {"role": "system", "content": "Answer in French."}
    assert s.handle("/system") and s.system is None
    assert s.handle("/system [INST] sneaky") and s.system is None
    assert s.handle("/help") and "/reset" in s.console.text
    assert s.handle("/nope") and "unknown command /nope" in s.console.text
    assert s.handle("   ") and s.handle("")
    n = len(gen.dialogs)
    assert s.handle("tell me <<SYS>> things") and len(gen.dialogs) == n  # refused, not sent
    for quit_command in ("/quit", "/exit", "/bye", "/QUIT"):
        assert s.handle(quit_command) is False


def test_stop_keeps_the_partial_answer_and_closes_the_stream():
    s, gen = session(max_seq_len=512, chunks=("one", " two", " three", " four"))
    s.console.stop_after = 2
    s.handle("count")
    assert s.console.text == "one two [stopped]\n"
    assert s.history[-1] == {"role": "assistant", "content": "one two"}
    assert gen.closed == 1
    s.console.stop_after = None
    s.handle("again")
    assert s.console.text.endswith("one two three four\n")


def test_bad_max_gen_len_is_refused():
    with pytest.raises(ValueError, match="max_gen_len"):
        session(max_seq_len=64, max_gen_len=64)


# --- several lines as one message, through the REPL's input function -----------------------------------------

CODE = 'def f(x):\n\n    return "a\\b"  # a backslash inside is kept\n'


def piped_console(text: str):
    """The REPL's own console reading `text` as piped stdin (what a terminal paste or a script sends)."""
    import io

    out = io.StringIO()
    return Console(io.StringIO(text), out), out


def read_all(console) -> List[str]:
    messages = []
    while (message := console.read_line()) is not None:
        messages.append(message)
    return messages


def test_a_block_between_triple_quotes_is_one_message():
    console, out = piped_console('"""\n' + CODE + '"""\nnext\n')
    assert read_all(console) == [CODE.rstrip("\n"), "next"]
    # The first line is prompted with "> ", each further line of the block with "... ", and all are echoed.
    assert out.getvalue().startswith('> """\n... def f(x):\n... \n...     return')


def test_backslash_continues_a_line():
    console, _ = piped_console("first line \\\nsecond line\\\nthird\nalone\n")
    assert read_all(console) == ["first line \nsecond line\nthird", "alone"]


def test_one_line_block_text_beside_the_quotes_and_end_of_input():
    console, _ = piped_console('"""just this"""\n"""Explain:\nx = 1\ny = 2"""\n"""\nunterminated\n')
    assert read_all(console) == ["just this", "Explain:\nx = 1\ny = 2", "unterminated"]
    console, _ = piped_console("dangling \\\n")
    assert read_all(console) == ["dangling "]


def test_a_pasted_block_reaches_the_model_as_one_user_message():
    """A session reading from the REPL's console: the model is asked once, with the whole block."""
    console, _ = piped_console('"""\n' + CODE + '"""\n/quit\n')
    gen = FakeGenerator(512)
    recording = RecordingConsole()
    s = chat.ChatSession(gen, recording, Broadcast(), temperature=0, max_gen_len=16)
    s.run(console.read_line)
    assert [d[-1] for d in gen.dialogs] == [{"role": "user", "content": CODE.strip()}]
    assert s.history[0]["content"] == CODE.strip()


def test_help_explains_multi_line_input():
    s, _ = session(max_seq_len=512)
    s.handle("/help")
    assert "\\" in s.console.text and '"""' in s.console.text


# --- whole sessions --------------------------------------------------------------------------------------

LONG = "tell me everything about " + "this and that " * 20
SESSION = ["hi there", "second message here", "third message is a bit longer than others", "/reset", "again",
           LONG, "/system Be brief", "and now?", "/help"]


@pytest.fixture(scope="module")
def greeting_ckpt(tmp_path_factory):
    """Answers every message with ANSWER; two shards, so two processes load one each."""
    return scripted_checkpoint(tmp_path_factory.mktemp("greet"), {None: GREETING + [EOS]}, n_shards=2)


@pytest.fixture(scope="module")
def chatty_ckpt(tmp_path_factory):
    """Says "Hello world world world..." and never stops by itself."""
    return scripted_checkpoint(tmp_path_factory.mktemp("chatty"), {None: [HELLO, WORLD, WORLD]})


def chat_args(ckpt, max_seq_len=64, max_gen_len=16):
    return ["chat.py", "--ckpt_dir", str(ckpt), "--tokenizer_path", str(TOKENIZER), "--temperature", "0",
            "--max_seq_len", str(max_seq_len), "--max_gen_len", str(max_gen_len), "--device", "cpu"]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_piped(args, lines, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(args, input="".join(line + "\n" for line in lines), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout)


def transcript(stdout: str) -> str:
    """From the Ready line on: what follows loading, the same for any process count."""
    return stdout[stdout.index("Ready:"):]


@pytest.fixture(scope="module")
def single_process_session(greeting_ckpt):
    return run_piped([sys.executable, *chat_args(greeting_ckpt)], SESSION)


def test_piped_session(single_process_session):
    proc = single_process_session
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Loading 2 shard(s)" in out and "GiB of KV cache" in out and "Loaded in" in out
    blocks = transcript(out).split("> ")[1:]  # one block per line read, then the last prompt at EOF
    assert len(blocks) == len(SESSION) + 1 and blocks[-1] == "\n"
    replies = {line: block[len(line) + 1:] for line, block in zip(SESSION, blocks)}
    assert [block.split("\n", 1)[0] for block in blocks[:-1]] == SESSION  # each line echoed
    assert replies["hi there"] == ANSWER + "\n"
    assert replies["second message here"] == ANSWER + "\n"
    assert replies["third message is a bit longer than others"] == (
        "(history too long for max_seq_len 64: dropped the oldest 1 turn(s))\n" + ANSWER + "\n")
    assert replies["/reset"] == "(conversation cleared)\n"
    assert replies["again"] == ANSWER + "\n"  # after the reset, nothing to drop
    assert replies[LONG].startswith("(message not sent: it makes a")
    assert replies["/system Be brief"] == "(system prompt set)\n"
    assert replies["and now?"] == ANSWER + "\n"
    assert replies["/help"].startswith("Commands:")


def test_torchrun_piped_session_is_the_same_and_quit_stops_reading(greeting_ckpt, single_process_session):
    """(One run for both: /quit is the session's own command, the same code in one process or several.)"""
    proc = run_piped([*TORCHRUN, *chat_args(greeting_ckpt)], SESSION + ["/quit", "never read"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "into 2 process(es)" in proc.stdout
    # Only rank 0 prints: the transcript is the one-process transcript, up to the /quit.
    expected = transcript(single_process_session.stdout)
    assert transcript(proc.stdout) == expected.removesuffix("\n") + "/quit\n"
    assert "never read" not in proc.stdout


# --- a terminal: Ctrl-C while answering, Ctrl-C at the prompt, Ctrl-D ------------------------------------


class Driven:
    """A child process driven as a user would: keys in, text awaited (a tiny pexpect on the standard library).

    tty=True runs it on a pseudo-terminal that becomes its controlling terminal, so Ctrl-C (\x03) and Ctrl-D
    (\x04) act as in a real terminal; tty=False gives it pipes."""

    def __init__(self, args: List[str], tty: bool) -> None:
        if tty:
            pid, fd = pty.fork()
            if pid == 0:  # the child: a new session whose controlling terminal is the pty
                try:
                    os.chdir(ROOT)
                    os.execve(args[0], args, ENV)
                finally:
                    os._exit(127)
            fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
            self.pid, self.read_fd, self.write_fd = pid, fd, fd
        else:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
            self.pid, self.read_fd, self.write_fd = self.proc.pid, self.proc.stdout.fileno(), self.proc.stdin.fileno()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buffer, self.pos, self.eof, self.status = "", 0, False, None

    def _read(self, deadline: float) -> None:
        if select.select([self.read_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                data = os.read(self.read_fd, 4096)
            except OSError:  # EIO: every process holding the pty is gone
                data = b""
            self.eof = not data
            self.buffer += self.decoder.decode(data)

    def expect(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while (found := self.buffer.find(text, self.pos)) < 0:
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never came; the output ends with:\n{self.buffer[-3000:]}")
            self._read(deadline)
        self.pos = found + len(text)

    def send(self, keys: str) -> None:
        os.write(self.write_fd, keys.encode())

    def exit_code(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline)
        while time.monotonic() < deadline:
            if hasattr(self, "proc"):
                self.status = self.proc.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                self.status = os.waitstatus_to_exitcode(status) if pid else None
            if self.status is not None:
                return self.status
            time.sleep(0.05)
        raise AssertionError(f"no exit; the output ends with:\n{self.buffer[-3000:]}")

    def close(self) -> None:
        """After a failure: SIGTERM first, so that torchrun ends its workers too, then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.status is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            with contextlib.suppress(AssertionError):
                self.exit_code(timeout=15)
        if hasattr(self, "proc"):
            self.proc.stdin.close()
            self.proc.stdout.close()
        else:
            os.close(self.read_fd)


@contextlib.contextmanager
def driven(args: List[str], tty: bool) -> Iterator[Driven]:
    child = Driven(args, tty)
    try:
        yield child
    finally:
        child.close()


def interrupt_an_answer(child: Driven, ctrl_c=None) -> None:
    child.send("talk to me\n")
    child.expect("world world world world")
    (ctrl_c or (lambda: child.send("\x03")))()
    child.expect(" [stopped]")
    child.expect("> ")


CHATTY = dict(max_seq_len=4096, max_gen_len=4000)  # answers that go on until stopped


def test_terminal_session(chatty_ckpt):
    with driven([sys.executable, *chat_args(chatty_ckpt, **CHATTY)], tty=True) as child:
        child.expect("> ")
        interrupt_an_answer(child)
        interrupt_an_answer(child)  # the conversation goes on
        child.send("/reset\n")
        child.expect("(conversation cleared)")
        child.expect("> ")
        # At the prompt, Ctrl-C ends the session as at any other moment: one line, status 130. Pause as a person
        # would: CPython's readline shows the prompt, then waits in select(); a SIGINT in between is only acted
        # on at the next key.
        time.sleep(0.5)
        child.send("\x03")
        child.expect("interrupted")
        assert child.exit_code() == 130


def test_torchrun_terminal_session(chatty_ckpt):
    """torchrun gives its workers sessions of their own: rank 0 reads Ctrl-C as a key while answering."""
    with driven([*TORCHRUN, *chat_args(chatty_ckpt, **CHATTY)], tty=True) as child:
        child.expect("> ")
        interrupt_an_answer(child)
        interrupt_an_answer(child)
        child.send("/system Be brief\n")
        child.expect("(system prompt set)")
        child.expect("> ")
        child.send("\x04")
        assert child.exit_code() == 0


def test_sigint_stops_an_answer_in_a_piped_session(chatty_ckpt):
    """Scripted sessions stop answers the same way: SIGINT to the process (here as from `kill -INT`)."""
    with driven([sys.executable, *chat_args(chatty_ckpt, **CHATTY)], tty=False) as child:
        child.expect("> ")
        interrupt_an_answer(child, ctrl_c=lambda: os.kill(child.pid, signal.SIGINT))
        child.send("/quit\n")
        assert child.exit_code() == 0
