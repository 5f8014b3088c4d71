"""What `Llama.build` loads and how: `BuildConfig`, its options, each checked once, when the config is made
(the load itself is llama/checkpoints/loading.py's `load`).

`Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, **options)` makes a BuildConfig of its
arguments; `Llama.build(config=BuildConfig(...))` takes one ready-made (keyword arguments beside it replace its
fields). A bad value is a ValueError naming it before any file is read; what depends on the files or the
machine (the device, the process count, quantize against a checkpoint's own scheme, LoRA adapters and the
family against the checkpoint) is checked as they are read, still before any weight loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch

from . import families
from .checkpoints import loading
from .engine.prefix_cache import check_flags as check_prefix_cache
from .engine.speculative import NgramDrafter, Speculation, check_choice
from .model.kv_cache import check_gib as check_kv_gib
from .model.kv_int8 import check_kv_dtype


@dataclass(frozen=True)
class BuildConfig:
    """Every option of `Llama.build`, in its order, with its default; checked when made (`check`)."""

    # A checkpoint folder in Meta's layout (consolidated.NN.pth + params.json) or Hugging Face's (config.json +
    # safetensors, such as meta-llama/Llama-2-7b-hf), and its tokenizer.model (SentencePiece or tiktoken).
    ckpt_dir: str
    tokenizer_path: str
    # One request's context (prompt plus answer), and the most requests running at once.
    max_seq_len: int
    max_batch_size: int
    # Processes the model is split over (default: all launched, under torchrun). Any count that divides the
    # model's split dimensions works, whatever the checkpoint's shard count.
    model_parallel_size: Optional[int] = None
    seed: int = 1  # a call's first row draws as a request seeded `seed` would, the next seed + 1, ...
    # None picks the best available: CUDA where there is a GPU; its best dtype (llama.cpu on a CPU).
    device: Union[str, torch.device, None] = None
    dtype: Union[str, torch.dtype, None] = None
    # None compiles the decode step into CUDA graphs on CUDA and stays eager on CPUs; True or False forces it.
    compile: Optional[bool] = None
    # False keeps the weights exactly in Meta's layout (no fused or packed products), for reading or editing
    # them through the model; True fuses them and, on a CPU, computes through the kernels llama.cpu picks.
    fast: bool = True
    # A PEFT LoRA adapter folder, merged into the weights as they load (the fast path for one adapter); or
    # {name: folder, ...}, adapters kept beside the unmerged base and chosen per request (`lora=name`;
    # llama/checkpoints/lora_slots.py): at most `max_loras` (default: all) in memory at once, of rank up to
    # `max_lora_rank` (default: the largest given).
    lora: Union[str, Mapping[str, str], None] = None
    max_loras: Optional[int] = None
    max_lora_rank: Optional[int] = None
    # "int8" (one scale per output row) or "int4" (groups of `group_size` inputs: 32, 64 or 128, default 64)
    # weight-only quantization of the linear layers at load (llama/quant); a checkpoint written by `llama
    # quantize` is loaded quantized as it is stored.
    quantize: Optional[str] = None
    group_size: Optional[int] = None
    # A request's tokens never depend on what else shares its batch (every decode step has one shape and every
    # prompt is prefilled alone; see "What a seed promises" in docs/serving.md for its cost).
    deterministic: bool = False
    # llama2, codellama, llama3 or llamaguard (default: detected from the files, see llama/families): the chat
    # format and the stop tokens.
    family: Optional[str] = None
    # "ngram" (prompt lookup) or a draft checkpoint folder sharing this tokenizer: decode with up to
    # `num_draft_tokens` drafted tokens per step, verified in one pass; the output is plain decoding's (greedy:
    # the same tokens; sampled: the same distribution). Not with deterministic mode or compile=True; with
    # compile=None the decode step stays eager (llama/engine/speculative.py).
    speculative: Optional[str] = None
    num_draft_tokens: int = 4
    # Keep the KV of prompts' full 16-token blocks and copy it into later requests that start the same way
    # (llama/engine/prefix_cache.py); off in deterministic mode. prefix_cache_gib: the most it keeps, per
    # process in GiB (default: the whole pool; blocks no request holds are evicted least recently used first).
    prefix_cache: bool = True
    prefix_cache_gib: Optional[float] = None
    # The paged KV cache's pool per process in GiB (llama/model/kv_cache.py): requests are admitted by free
    # blocks of 16 positions. Default: what fits beside the weights, at most max_batch_size full contexts.
    kv_cache_gib: Optional[float] = None
    # None or "auto" stores keys and values in the model's dtype; "int8" stores them in 8 bits with a scale per
    # position and head (llama/model/kv_int8.py): about half the memory, so twice the tokens in kv_cache_gib.
    kv_dtype: Optional[str] = None
    # A Jinja chat template (a file, or the template's text) for chat prompts, rendered as transformers'
    # apply_chat_template renders it; default: a Hugging Face checkpoint's own (tokenizer_config.json), else
    # the family's Meta format (llama/families/prompting.py).
    chat_template: Optional[str] = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """ValueError naming the first bad option: every check that needs neither the files nor the machine."""
        loading.check_sizes(self.max_seq_len, self.max_batch_size, self.seed)
        check_choice(self.speculative)
        check_prefix_cache(self.prefix_cache, self.prefix_cache_gib)
        check_kv_gib(self.kv_cache_gib)
        check_kv_dtype(self.kv_dtype)
        if self.speculative is not None:
            Speculation(NgramDrafter(), self.num_draft_tokens)  # checks num_draft_tokens
            if self.deterministic or self.compile:
                raise ValueError(f"speculative={self.speculative!r} cannot run with "
                                 f"{'deterministic=True' if self.deterministic else 'compile=True'}: its "
                                 "verification passes change shape from step to step")
        loading.check_switches(self.fast, self.deterministic)
        if self.dtype is not None:
            loading.parse_dtype(self.dtype)
        if self.family is not None:
            families.get(self.family)  # a known name (whether it fits the checkpoint is checked on reading)

    def draft(self) -> "BuildConfig":
        """The draft model's config for speculative=FOLDER: eager, no prefix cache, and a token KV pool (the
        drafter gives it rows of its own)."""
        return BuildConfig(str(self.speculative), self.tokenizer_path, self.max_seq_len, self.max_batch_size,
                           self.model_parallel_size, seed=self.seed, device=self.device, dtype=self.dtype,
                           compile=False, fast=self.fast, prefix_cache=False, kv_cache_gib=1e-6,
                           kv_dtype=self.kv_dtype)


def config_from(args: Sequence[Any], config: Optional[BuildConfig], options: Dict[str, Any]) -> BuildConfig:
    """`Llama.build`'s arguments as one BuildConfig: the positional and keyword options, or `config` (by name
    or alone by position) with `options` replacing its fields. TypeErrors name `Llama.build`, as its own
    signature's did."""
    if config is None and len(args) == 1 and isinstance(args[0], BuildConfig):
        args, config = (), args[0]  # Llama.build(BuildConfig(...))
    try:
        if config is None:
            return BuildConfig(*args, **options)
        if not isinstance(config, BuildConfig):
            raise ValueError(f"config must be a BuildConfig, got {type(config).__name__}: {config!r}")
        if args:
            raise TypeError("Llama.build() takes either a config or positional arguments, not both")
        return dataclasses.replace(config, **options) if options else config
    except TypeError as err:
        raise TypeError(str(err).replace("BuildConfig.__init__()", "Llama.build()")) from None
