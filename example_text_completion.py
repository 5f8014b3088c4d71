"""Complete a few text prompts. Run: torchrun --nproc_per_node MP example_text_completion.py --ckpt_dir ...

With no --ckpt_dir/--tokenizer_path it runs the bundled demo model (plain `python` is enough for it).
"""

from typing import Optional

from llama import Llama
from llama.cli import resolve_checkpoint, run
from llama.distributed import print0

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
):
    """stream: print each completion token by token as it is generated, one prompt at a time.
    lora: a PEFT LoRA adapter folder to merge into the weights.
    quantize: int8 or int4 weight-only quantization at load (group_size: int4's 32, 64 or 128).
    """
    ckpt_dir, tokenizer_path = resolve_checkpoint(ckpt_dir, tokenizer_path)
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
