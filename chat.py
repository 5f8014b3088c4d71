"""Chat with a Llama 2 chat model in the terminal; answers appear token by token.

    torchrun --nproc_per_node MP chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    python chat.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model   # one process
    python chat.py                                                                # the bundled demo model

Commands: /help, /reset, /system [TEXT], /quit (or Ctrl-D). Ctrl-C stops an answer. The program lives in
llama/chat.py (installed as `llama-chat`); this file keeps the released reference's way of running it.
"""

from llama.chat import main
from llama.cli import run

if __name__ == "__main__":
    run(main)
