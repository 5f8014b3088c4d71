"""`llama-chat`, `python -m llama chat`, `python chat.py`: chat with a Llama chat model in the terminal.

The conversation itself (commands, history, streamed answers, torchrun in step) is llama/programs/terminal_chat.py
and the terminal (reading messages, Ctrl-C) llama/programs/console.py; this module reads the flags, loads the
model and wires the terminal and signals to it.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from typing import List, Optional

from . import cli
from .console import Console, SilentConsole, leave_on_sigint
from .terminal_chat import SHIELD_CONTEXT, _HELP, ChatSession, _answer_room
from ..model.distributed import Broadcast, launched
from ..generation import Llama


def parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        "python -m llama chat",
        "Chat with a Llama chat model in the terminal; answers appear token by token. With no --ckpt_dir "
        "and --tokenizer_path it chats with the bundled demo model. Run under torchrun for model parallelism.",
        epilog="In the chat:\n" + _HELP, formatter_class=_ChatHelp)
    cli.add_model_flags(p, what="chat checkpoint folder")
    p.add_argument("--system", default=None, help="system prompt (change it in the chat with /system)")
    cli.add_sampling_flags(p)
    p.add_argument(*cli.flag("max_seq_len"), type=int, default=2048,
                   help="context length: the conversation, the system prompt and the answer, in tokens")
    p.add_argument(*cli.flag("max_gen_len"), type=int, default=None,
                   help="longest answer in tokens, kept free in the context (default max_seq_len / 4)")
    cli.add_speculation_flags(p)
    p.add_argument("--shield", default=None, metavar="CKPT",
                   help="a Llama Guard checkpoint folder: each message and each answer is checked, and refused "
                        "when unsafe")
    return p


class _ChatHelp(cli.HelpFormatter):
    """The flags' help, and the in-chat commands below it as written (not reflowed)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return text if text.startswith("In the chat:") else super()._fill_text(text, width, indent)


def chat(opts: argparse.Namespace) -> None:
    """Load the model and hold the conversation until /quit or the end of input."""
    if launched():  # torchrun's Ctrl-C reaches the workers as SIGINT while it ends the run: leave quietly
        signal.signal(signal.SIGINT, functools.partial(leave_on_sigint, None))
    _answer_room(opts.max_seq_len, opts.max_gen_len)
    ckpt_dir, tokenizer_path = cli.resolve_checkpoint(opts.ckpt_dir, opts.tokenizer_path)
    formatter = cli.chat_format_for(tokenizer_path, opts.family)
    if opts.system and formatter.contains_tags(opts.system):
        raise ValueError(f"--system may not contain {formatter.tags_text()}")
    shield_files = cli.resolve_shield(opts.shield)
    cli.check_before_loading(tokenizer_path, opts.max_seq_len, 1, opts.temperature, opts.top_p, opts.max_gen_len,
                             family=opts.family)
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=opts.max_seq_len,
                            max_batch_size=1, seed=opts.seed, device=opts.device, dtype=opts.dtype,
                            lora=opts.lora, quantize=opts.quantize, group_size=opts.group_size,
                            family=opts.family, speculative=opts.speculative,
                            num_draft_tokens=opts.num_draft_tokens, kv_dtype=opts.kv_dtype)
    guard = None
    if shield_files is not None:
        guard = Llama.build(ckpt_dir=shield_files[0], tokenizer_path=shield_files[1],
                            max_seq_len=opts.max_seq_len + SHIELD_CONTEXT, max_batch_size=1, seed=opts.seed,
                            device=opts.device, dtype=opts.dtype, family="llamaguard")
    channel = Broadcast()
    if channel.rank == 0:
        for stream in (sys.stdout, sys.stdin):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="replace")  # a terminal that cannot show a character gets '?'
        console = Console(sys.stdin, sys.stdout)
    else:
        console = SilentConsole()
    if launched() or channel.world > 1:
        signal.signal(signal.SIGINT, functools.partial(leave_on_sigint, console if channel.rank == 0 else None))
    else:
        signal.signal(signal.SIGINT, console.on_sigint)
    session = ChatSession(generator, console, channel, system=opts.system, temperature=opts.temperature,
                          top_p=opts.top_p, max_gen_len=opts.max_gen_len, shield=guard)
    console.write(f"Ready: max_seq_len {session.max_seq_len}, answers up to {session.max_gen_len} tokens, "
                  f"temperature {session.temperature}. /help lists the commands; Ctrl-C stops an answer, "
                  f"Ctrl-D or /quit leaves; a line ending in \\ goes on to the next.\n")
    if session.system:
        console.write(f"System prompt: {session.system}\n")
    session.run(console.read_line if channel.rank == 0 else None)


def main(argv: Optional[List[str]] = None) -> int:
    opts = parser().parse_args(argv)
    return cli.guarded(lambda: chat(opts))


def entry_point() -> None:
    cli.exit_with(main)
