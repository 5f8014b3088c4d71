"""The terminal chat with a Llama chat model (Llama 2, Code Llama Instruct, Llama 3.x): answers appear token by
token. The program that runs it is llama/programs/chat.py:

    torchrun --nproc_per_node MP chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    python chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model   # one process
    python chat.py                                                                # the bundled demo model
    llama-chat ...  /  python -m llama chat ...                                   # the same, once installed

Type a message and press Enter. Commands: /help, /reset, /system [TEXT], /quit (or Ctrl-D). Ctrl-C while an
answer streams stops it and the conversation goes on. Messages of several lines, piped stdin and the keys are
the terminal's part: llama/programs/console.py.

Under torchrun, rank 0 reads the terminal and sends every line to the other ranks; all ranks generate in step
and only rank 0 prints. Every rank asks, at each chunk of an answer, whether rank 0 saw Ctrl-C, so all ranks
stop the answer at the same chunk.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from ..families.chat_format import Message
from ..engine.params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from ..model.distributed import Broadcast
from ..generation import Llama

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
