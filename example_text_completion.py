"""Complete a few text prompts. Run: torchrun --nproc_per_node MP example_text_completion.py --ckpt_dir ...

With no --ckpt_dir/--tokenizer_path it runs the bundled demo model (plain `python` is enough for it).
"""

from typing import Optional

from llama import Llama
from llama.checkpoints.loading import set_verbose
from llama.programs.cli import check_before_loading, resolve_checkpoint, run
from llama.model.distributed import print0

PROMPTS = [
    # For these prompts, the expected answer is the natural continuation of the prompt
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    # Few shot prompt (providing a few examples before asking model to complete more);
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
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
    max_seq_len: longest prompt plus completion, in tokens
    max_gen_len: longest completion, in tokens
    max_batch_size: most prompts completed at once
    device: cuda, cuda:N or cpu (default: cuda where there is a GPU)
    dtype: bfloat16, float16 or float32 (default: the fastest the device supports)
    stream: print each completion token by token as it is generated, one prompt at a time
    lora: a PEFT LoRA adapter folder to merge into the weights
    quantize: int8 or int4 weight-only quantization at load (none for a quantized checkpoint)
    group_size: int4's inputs per scale: 32, 64 or 128 (default 64)
    verbose: report the load's detail: the CPU's flags and the kernels the layers run (as LLAMA_LOG=debug)
    """
    set_verbose(verbose)
    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path)
    check_before_loading(tokenizer_path, max_seq_len, max_batch_size, temperature, top_p, max_gen_len, PROMPTS)
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=max_batch_size, device=device, dtype=dtype, lora=lora,
                            quantize=quantize, group_size=group_size)
    if stream:
        for prompt in PROMPTS:
            print0(prompt)
            print0("> ", end="")
            for chunk in generator.stream_text_completion(prompt, max_gen_len=max_gen_len,
                                                          temperature=temperature, top_p=top_p):
                print0(chunk, end="")
            print0("\n\n==================================\n")
        return
    results = generator.text_completion(PROMPTS, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    for prompt, result in zip(PROMPTS, results):
        print0(prompt)
        print0(f"> {result['generation']}")
        print0("\n==================================\n")


if __name__ == "__main__":
    run(main)
