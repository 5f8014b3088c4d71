"""What `Llama.build` composes: inspect the files, plan the run, then load, check and prepare the model.

Each step fails early with an error naming the bad input: everything that can be checked from the files'
headers and the arguments is checked before any process group is joined or any weight is read.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch

from .. import cpu, families, quant
from ..model import distributed
from . import quantize
from .checkpoint import Check, check_model_parallel_size
from .source import Files, describe
from .lora import LoraAdapter, merge_lora, read_adapter
from ..model.decode_step import default_compile
from ..model.kv_cache import BLOCK_SIZE, pool_blocks, pool_bytes_per_block
from ..model.transformer import ModelArgs, Transformer, check_positive_int, memory_per_process
from ..families import Family
from ..families.templates import ChatTemplate, load as load_template
from ..model.args import ArchSpec
from ..model.kv_int8 import check_kv_dtype
from ..tokenizers import BaseTokenizer

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be 'bfloat16', 'float16', 'float32' (or that torch.dtype), got {dtype!r}")


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device, quantized: bool = False
                  ) -> torch.dtype:
    """None: on a GPU bfloat16 where supported, else float16; on a CPU what its kernels run fastest
    (llama.cpu.default_dtype: bfloat16 with native bf16 or fbgemm, else float32), and bfloat16 for a quantized
    model (PyTorch's CPU int8/int4 kernels take bfloat16 activations only)."""
    if dtype is None:
        if device.type == "cpu":
            return torch.bfloat16 if quantized else cpu.default_dtype(device)
        return torch.float16 if device.type == "cuda" and not torch.cuda.is_bf16_supported() else torch.bfloat16
    return parse_dtype(dtype)


@dataclass(frozen=True)
class Plan:
    """The run's decisions, made once, checked once and never patched: process count, device (with its index:
    this process's GPU), dtype, the faster kernels, whether the decode step is compiled, deterministic mode,
    and the weight-only quantization scheme (llama/quant), or None."""

    model_parallel_size: int
    device: torch.device
    dtype: torch.dtype
    fast: bool
    compile: bool = False
    deterministic: bool = False
    scheme: Optional[quant.Scheme] = None
    note: Optional[str] = None  # one line when an explicitly chosen dtype is the slow one on this CPU

    @property
    def quantize(self) -> Optional[str]:
        """The scheme's name ("int8", "int4"), None when unquantized."""
        return None if self.scheme is None else self.scheme.name

    @property
    def group_size(self) -> Optional[int]:
        return None if self.scheme is None else self.scheme.group_size


def check_sizes(max_seq_len: int, max_batch_size: int, seed: int) -> None:
    check_positive_int("max_seq_len", max_seq_len)
    check_positive_int("max_batch_size", max_batch_size)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def check_switches(fast: bool, deterministic: bool) -> None:
    """fast and deterministic are True or False: ValueError naming the other value."""
    if not isinstance(fast, bool):
        raise ValueError(f"fast must be True or False, got {fast!r}")
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be True or False, got {deterministic!r}")


@dataclass
class LoadedModel:
    """What `load` made: this process's share of the model, with what it was read with and decided on."""

    model: Transformer
    tokenizer: BaseTokenizer
    family: Family
    plan: Plan
    rank: int  # this process's place in the model-parallel group
    template: Optional[ChatTemplate] = None  # the chat template asked for, or the checkpoint's own
    checked: Any = None  # what the caller's `check` returned


def load(config: Any, tokenizer: BaseTokenizer, check: Optional[Callable[[ModelArgs], Any]] = None) -> LoadedModel:
    """Load a `BuildConfig`'s checkpoint (llama/builder.py) into this process's share of a model-parallel
    Transformer, read with `tokenizer` (the config's tokenizer_path's), asking each module once, in the order the
    data travels: the folder's files (source.py, which converts a config.json through hf_config.py), the family,
    the plan of the run, then the layout's reader (its weights' headers checked, then this rank's tensors), the
    LoRA adapter, the quantization, and the model.
    Everything the arguments and the small files say is checked before any process group is joined; what the
    weights' headers say, before any weight is read. `check(args)`: the caller's own checks of the model (its
    LoRA adapters), before anything loads; its result is the LoadedModel's `checked`."""
    c, start = config, time.perf_counter()
    found = describe(c.ckpt_dir)
    text = load_template(c.chat_template) if c.chat_template is not None else found.template
    template = ChatTemplate(text[0], tokenizer, text[1]) if text else None  # compiled before the load
    merged = c.lora if c.lora is None or isinstance(c.lora, (str, os.PathLike)) else None
    family, args, adapter = _model(found, tokenizer, c.max_seq_len, c.max_batch_size, merged, c.family)
    checked = check(args) if check is not None else None
    if c.speculative not in (None, "ngram"):  # a draft checkpoint: its files and vocabulary, before loading
        inspect(c.speculative, tokenizer, c.max_seq_len, c.max_batch_size)
    planned = plan(args, c.model_parallel_size, c.device, c.dtype, c.fast, c.quantize, c.group_size, found.scheme,
                   compile=False if c.speculative is not None else c.compile, deterministic=c.deterministic)
    runtime = distributed.setup(planned.model_parallel_size, planned.device)
    torch.manual_seed(c.seed)
    headers = _headers_check(found, family, args, tokenizer, c.family, announcement(found, family, args, planned))
    model = load_model(found, args, planned, runtime.model_parallel_rank, headers, adapter,
                       kv_cache_gib=c.kv_cache_gib, kv_dtype=check_kv_dtype(c.kv_dtype))
    distributed.print0(f"Loaded in {time.perf_counter() - start:.2f} seconds")
    return LoadedModel(model, tokenizer, family, planned, runtime.model_parallel_rank, template, checked)


def inspect(ckpt_dir: str, tokenizer: BaseTokenizer, max_seq_len: int, max_batch_size: int,
            lora: Optional[str] = None, family: Optional[str] = None) -> Tuple[Files, Family, ModelArgs]:
    """A checkpoint's files and weights' headers (no weight is read), checked as `load` checks them (a draft
    model's, before the model it drafts for loads)."""
    found = describe(ckpt_dir)
    detected, args, _ = _model(found, tokenizer, max_seq_len, max_batch_size, lora, family)
    info = found.reader.peek(found)
    _headers_check(found, detected, args, tokenizer, family)(info.arch, info.vocab_rows)
    return found, detected, args


def _model(found: Files, tokenizer: BaseTokenizer, max_seq_len: int, max_batch_size: int,
           lora: Optional[str] = None, requested: Optional[str] = None
           ) -> Tuple[Family, ModelArgs, Optional[LoraAdapter]]:
    """The family (detected, or `requested` checked against the files), the model's ModelArgs for the run and the
    LoRA adapter to merge, from the small files: checked against the tokenizer and the adapter. Meta's layout
    says its architecture options (biases) and embedding rows in the weights alone: until the reader's headers
    confirm them (`_headers_check`), they are the family's and the tokenizer's."""
    params = found.params
    arch = found.arch if found.arch is not None or requested is not None else ArchSpec()  # Meta's: none
    detected = families.detect(tokenizer, params, requested, arch)
    vocab = params.get("vocab_size", -1)
    args = ModelArgs.from_params(params, arch=detected.arch if found.arch is None else found.arch,
                                 max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                                 vocab_size=tokenizer.n_words if vocab == -1 else vocab)
    if lora is not None and found.quantization is not None:
        raise ValueError(f"a LoRA adapter cannot be merged into the quantized weights of {found.folder!r}: load "
                         "its bfloat16 source with quantize= instead (the adapter is merged, then quantized)")
    return detected, args, read_adapter(lora, args) if lora is not None else None


def _headers_check(found: Files, family: Family, args: ModelArgs, tokenizer: BaseTokenizer,
                   requested: Optional[str], announce: Sequence[str] = ()) -> Check:
    """What the weights' headers must say, checked by the reader between reading them and the weights: the
    embedding rows of the tokenizer, the architecture options of the model planned. Then the lines `announce`
    are printed: the load is announced once nothing is left to check."""

    def check(arch: ArchSpec, vocab_rows: int) -> None:
        if args.vocab_size != tokenizer.n_words or vocab_rows != tokenizer.n_words:
            raise ValueError(f"tokenizer {tokenizer.path!r} has {tokenizer.n_words} tokens but the checkpoint in "
                             f"{found.folder!r} has {vocab_rows} embedding rows (params.json vocab_size "
                             f"{found.params.get('vocab_size', -1)}): they do not belong together")
        if arch != args.arch:  # the family's error when it does not fit (or no family does)
            fits = families.detect(tokenizer, found.params, requested, arch)
            raise ValueError(f"the weights in {found.folder!r} have {arch.describe()}: {fits.title}'s, not "
                             f"{family.title}'s as the other files say; pass family={fits.name!r}")
        for line in announce:
            distributed.print0(line)

    return check


def plan(args: ModelArgs, model_parallel_size: Optional[int], device, dtype, fast: bool,
         quantize_mode: Optional[str] = None, group_size: Optional[int] = None,
         stored: Union[quant.Scheme, dict, None] = None, compile: Optional[bool] = None,
         deterministic: bool = False) -> Plan:
    """Pick the device, the process count, the dtype, compilation and the quantization once, and check that the
    model can be split and run so. `stored`: the checkpoint's own quantization scheme (or its params.json
    entry), if any."""
    check_switches(fast, deterministic)
    dev = distributed.pick_device(device)
    mp = distributed.planned_model_parallel_size(model_parallel_size)
    check_model_parallel_size(args, mp)
    quantized = quantize_mode is not None or stored is not None
    result = Plan(mp, dev, resolve_dtype(dtype, dev, quantized), fast, default_compile(dev, compile), deterministic)
    if dtype is not None and not quantized:
        result = replace(result, note=cpu.dtype_note(dev, result.dtype))
    if stored is not None:
        scheme = stored if isinstance(stored, quant.Scheme) else quant.from_entry(stored, "params.json")
        asked = quantize_mode.name if isinstance(quantize_mode, quant.Scheme) else quantize_mode
        if asked not in (None, scheme.name) or group_size not in (None, scheme.group_size):
            raise ValueError(f"the checkpoint is quantized ({scheme.name}, group_size {scheme.group_size}); it "
                             f"cannot be loaded as quantize={quantize_mode!r}, group_size={group_size!r}: pass "
                             "neither, or quantize its bfloat16 source")
        if not fast:
            raise ValueError(f"the checkpoint is quantized ({scheme.name}) and needs fast=True: its layers hold no "
                             "weights in Meta's layout for fast=False to keep")
    elif quantize_mode is None:
        if group_size is not None:
            raise ValueError(f"group_size={group_size!r} needs quantize='int4'")
        return result
    else:
        scheme = quant.parse(quantize_mode, group_size)
    if not fast:
        raise ValueError(f"quantize={scheme.name!r} needs fast=True: quantized layers replace the weights, so "
                         "the model cannot keep them in Meta's layout as fast=False promises")
    scheme.check_device(result.device, result.dtype)
    scheme.check_shapes(quantize.linear_shapes(args, mp), mp, result.device.type)
    return replace(result, scheme=scheme)


def announcement(found: Files, family: Optional[Family], args: ModelArgs, plan: Plan) -> List[str]:
    """What to say before the weights are read: what loads where, the memory it takes per process, and the
    plan's note, if any."""
    weights, cache = memory_per_process(args, plan.dtype, plan.model_parallel_size)
    kind = ""
    if plan.scheme is not None:
        weights = quantize.weight_bytes(args, plan.scheme, None, plan.dtype, plan.model_parallel_size)
        kind = f"{plan.scheme.name} " + ("(quantized at load) " if found.quantization is None else "")
    title = f"{family.title}: " if family is not None else ""
    return [
        f"{title}Loading {len(found.files)} shard(s) from {found.folder} into {plan.model_parallel_size} "
        f"process(es) on "
        f"{plan.device.type}, {str(plan.dtype).removeprefix('torch.')}: per process {weights / 2**30:.2f} GiB of "
        f"{kind}weights + at most {cache / 2**30:.2f} GiB of KV cache ({args.max_batch_size} full contexts of "
        f"{args.max_seq_len} tokens, paged)"] + ([plan.note] if plan.note else [])


def load_model(found: Files, args: ModelArgs, plan: Plan, rank: int, check: Check,
               adapter: Optional[LoraAdapter] = None, kv_cache_gib: Optional[float] = None,
               kv_dtype: Optional[str] = None) -> Transformer:
    """This rank's share of the model, on its device: the reader's tensors (its headers checked by `check`), the
    adapter merged, the weights quantized or as stored, prepared, and its KV cache allocated: a pool of
    kv_cache_gib GiB, by default what fits beside the weights (kv_cache.default_gib; with several processes, at
    most max_batch_size full contexts, the same on every rank), storing keys and values in the model's dtype or
    in int8 (kv_dtype, model/kv_int8.py: twice the tokens in the same memory)."""
    if plan.scheme is not None:
        kernel = quantize.kernel_for_quantize(plan.scheme, plan.device, plan.dtype)
    else:
        kernel = cpu.kernel_for(plan.device, plan.dtype, max_batch=args.max_batch_size) if plan.fast else None
    # Preparing replaces weights by new buffers (fused, packed): on the CPU, read tensors into buffers of their
    # own rather than one shared mapping, so that each original is freed as soon as it is replaced.
    stored = found.scheme
    state = found.reader.load(found, rank, plan.model_parallel_size, check, dtype=plan.dtype, device=plan.device,
                              mmap=not (plan.fast and plan.device.type == "cpu"), progress=_report_shard,
                              scheme=stored)
    if adapter is not None:
        merge_lora(state, adapter, rank, plan.model_parallel_size, args)
        _report_lora(adapter)
    state.pop("rope.freqs", None)  # the rotary tables are recomputed in float32 from rope_theta
    with torch.device("meta"):
        model = Transformer(args)
    if stored is not None:  # its linear layers go in as they are stored: no bfloat16 copy
        quantize.install(model, quantize.take_quantized(state, stored, found.folder), stored, found.folder)
    _check_state(model, state, found.folder)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    if plan.scheme is not None and stored is None:
        quantize.quantize_model(model, plan.scheme)
    if plan.fast:
        model.prepare(kernel)
    attn = model.layers[0].attention
    per_block = pool_bytes_per_block(args.n_layers, attn.n_local_kv_heads, args.head_dim, plan.dtype,
                                     kv_dtype=kv_dtype)
    device = plan.device if plan.model_parallel_size == 1 else torch.device("meta")  # the cap: same on every rank
    blocks = pool_blocks(kv_cache_gib, per_block, args.max_batch_size, args.max_seq_len, device)
    model.setup_cache(plan.device, plan.dtype, blocks=blocks, kv_dtype=kv_dtype)
    stored = "int8 with a bfloat16 scale per position and head" if model.kv_dtype else \
        str(plan.dtype).removeprefix("torch.")
    distributed.print0(f"KV cache: {blocks - 1} blocks of {BLOCK_SIZE} positions ({(blocks - 1) * BLOCK_SIZE} "
                       f"tokens, {stored}, {blocks * per_block / 2 ** 30:.2f} GiB per process{'' if kv_cache_gib else ', what fits beside the weights, at most max_batch_size full contexts'})")
    if plan.device.type == "cpu":
        _report_cpu(model)
    return model.eval()


LOG_ENV = "LLAMA_LOG"  # LLAMA_LOG=debug (or a program's --verbose): the load reports its detail


def verbose() -> bool:
    """Whether loading reports its detail: the CPU's deciding flags and the kernels each linear layer runs."""
    return os.environ.get(LOG_ENV, "").strip().lower() == "debug"


def set_verbose(on: bool = True) -> None:
    """A program's --verbose: this process (and the processes it starts) report the detail."""
    if on:
        os.environ[LOG_ENV] = "debug"


def _report_cpu(model: Transformer) -> None:
    """One line about where the model runs: plain words by default, the kernels when verbose."""
    if verbose():
        distributed.print0(cpu.describe(model))  # the kernels that will run, counted from the model
        return
    threads = torch.get_num_threads()
    distributed.print0(f"Running on {cpu.info().model} with {threads} thread{'' if threads == 1 else 's'} "
                       f"(--verbose or {LOG_ENV}=debug: its kernels)")


def _report_lora(adapter: LoraAdapter) -> None:
    """Say what was merged, so that an adapter never changes the answers unannounced."""
    layers = {key.split(".")[1] for key in adapter.weights if key.startswith("layers.")}
    distributed.print0(f"  merged LoRA adapter {adapter.path} (r {adapter.r}, alpha {adapter.alpha:g}, scale "
                       f"{adapter.scale:g}) into {len(adapter.weights)} weights of {len(layers)} layer"
                       f"{'' if len(layers) == 1 else 's'}")


def _report_shard(done: int, total: int, path, seconds: float) -> None:
    size = path.stat().st_size / 2**20 if path.is_file() else 0.0
    distributed.print0(f"  rank 0 read shard {done}/{total} ({path.name}, {size:.1f} MiB) after {seconds:.1f} s")


def _check_state(model: Transformer, state: dict, ckpt_dir: str) -> None:
    """Every weight the model needs, of the right shape: otherwise say which, before assigning anything."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs params.json {tuple(expected[k])}"
             for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint in {ckpt_dir!r} does not match its header (params.json or config.json): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
