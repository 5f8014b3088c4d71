"""Answer a few chat dialogs. Run: torchrun --nproc_per_node MP example_chat_completion.py --ckpt_dir ...

With no --ckpt_dir/--tokenizer_path it runs the bundled demo model (plain `python` is enough for it): a tiny model
that answers in one short sentence of its own (it is not Llama 2).
"""

from typing import List, Optional

from llama import Dialog, Llama
from llama.checkpoints.loading import set_verbose
from llama.programs.cli import check_before_loading, resolve_checkpoint, run
from llama.model.distributed import print0

DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "Paris, the capital of France, is known for the Eiffel Tower, the Louvre "
                                         "Museum and Notre-Dame cathedral."},
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    [
        {"role": "system", "content": "Always answer with emojis"},
        {"role": "user", "content": "How to go from Beijing to NY?"},
    ],
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    stream: bool = False,
    lora: Optional[str] = None,
    quantize: Optional[str] = None,
    group_size: Optional[int] = None,
    verbose: bool = False,
):
    """
    ckpt_dir: checkpoint folder, Meta's layout or Hugging Face's (default, with tokenizer_path unset: the demo)
    tokenizer_path: the tokenizer.model file (default for a Hugging Face folder: its own)
    temperature: sampling temperature; 0 is greedy
    top_p: nucleus sampling: draw from the most likely tokens whose probabilities add up to this
    max_seq_len: longest dialog plus answer, in tokens
    max_batch_size: most dialogs answered at once
    max_gen_len: longest answer, in tokens (default: as long as max_seq_len allows)
    device: cuda, cuda:N or cpu (default: cuda where there is a GPU)
    dtype: bfloat16, float16 or float32 (default: the fastest the device supports)
    stream: print each answer token by token as it is generated, one dialog at a time
    lora: a PEFT LoRA adapter folder to merge into the weights
    quantize: int8 or int4 weight-only quantization at load (none for a quantized checkpoint)
    group_size: int4's inputs per scale: 32, 64 or 128 (default 64)
    verbose: report the load's detail: the CPU's flags and the kernels the layers run (as LLAMA_LOG=debug)
    """
    set_verbose(verbose)
    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path)
    check_before_loading(tokenizer_path, max_seq_len, max_batch_size, temperature, top_p, max_gen_len,
                         dialogs=DIALOGS)
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=max_batch_size, device=device, dtype=dtype, lora=lora,
                            quantize=quantize, group_size=group_size)
    if stream:
        for dialog in DIALOGS:
            for msg in dialog:
                print0(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print0("> Assistant: ", end="")
            for chunk in generator.stream_chat_completion(dialog, max_gen_len=max_gen_len,
                                                          temperature=temperature, top_p=top_p):
                print0(chunk, end="")
            print0("\n\n==================================\n")
        return
    results = generator.chat_completion(DIALOGS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for dialog, result in zip(DIALOGS, results):
        for msg in dialog:
            print0(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print0(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print0("\n==================================\n")


if __name__ == "__main__":
    run(main)
