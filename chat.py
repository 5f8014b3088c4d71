"""Chat with a Llama 2 chat model in the terminal; answers appear token by token.

    torchrun --nproc_per_node MP chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    python chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model   # one process
    python chat.py                                                                # the bundled demo model

Commands: /help, /reset, /system [TEXT], /quit (or Ctrl-D). Ctrl-C stops an answer. A line ending in a
backslash continues on the next; a block between lines of triple quotes is one message. The program lives in
llama/programs/chat.py (installed as `llama-chat`, also `python -m llama chat`); this file runs it from a
clone.
"""

from llama.programs.chat import entry_point

if __name__ == "__main__":
    entry_point()
