"""Llama: build a model-parallel generator from a checkpoint, then complete text and dialogs.

One decode loop serves everything: `_stream_steps` prefills the whole (ragged) batch in one forward pass,
then decodes one token per step for all rows at once, each row at its own position, until every row has
finished. `generate` collects what it yields; the streaming methods yield text as it comes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import torch
import torch.nn.functional as F

from . import cpu, distributed
from .chat_format import UNSAFE_ERROR, ChatFormat, Dialog, Message, has_special_tags, validate_dialog
from .checkpoint import check_model_parallel_size, inspect_checkpoint, load_rank_state
from .model import ModelArgs, Transformer, count_parameters
from .sampling import check_sampling_args, next_token
from .tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # with logprobs=True: each token as text
    logprobs: List[float]  # with logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]
    logprobs: List[float]


DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """None: on a GPU bfloat16 where supported, else float16; on a CPU what its kernels run fastest
    (llama.cpu.default_dtype: bfloat16 with native bf16 or fbgemm, else float32)."""
    if dtype is None:
        if device.type == "cpu":
            return cpu.default_dtype(device)
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be 'bfloat16', 'float16', 'float32' (or that torch.dtype), got {dtype!r}")


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass
class _Step:
    """One decode step for the whole batch: each row's new token, whether the row produced it, its log-prob."""

    tokens: List[int]
    emitted: List[bool]
    logprobs: Optional[List[float]]


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        compile: bool = False,
        fast: bool = True,
    ) -> "Llama":
        """Load a checkpoint in Meta's layout into this process's share of a model-parallel Transformer.

        Run by every process of the group (torchrun), or alone for a one-process run. Any process count that
        divides the model's split dimensions works, whatever the checkpoint's shard count. compile=True runs
        the decode step through torch.compile (the first calls are slow while it compiles). fast=False turns
        off the faster kernels chosen for this CPU where they help (llama.cpu: oneDNN-packed bf16 weights with
        native bf16 instructions, fbgemm's fp16 kernels on other x86 CPUs); the path taken is printed.
        """
        start = time.perf_counter()
        _positive_int("max_seq_len", max_seq_len)
        _positive_int("max_batch_size", max_batch_size)
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        # Cheap checks first: the files, the tokenizer and the shapes, before any process group or weight.
        tokenizer = Tokenizer(tokenizer_path)
        info = inspect_checkpoint(ckpt_dir)
        args = ModelArgs.from_params(info.params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words
        if args.vocab_size != tokenizer.n_words or info.vocab_rows != tokenizer.n_words:
            raise ValueError(f"tokenizer {tokenizer_path!r} has {tokenizer.n_words} tokens but the checkpoint in "
                             f"{ckpt_dir!r} has {info.vocab_rows} embedding rows (params.json vocab_size "
                             f"{info.params.get('vocab_size', -1)}): they do not belong together")

        model_dtype = resolve_dtype(dtype, distributed.pick_device(device))
        check_model_parallel_size(args, distributed.planned_model_parallel_size(model_parallel_size))
        runtime = distributed.setup(model_parallel_size, device)
        torch.manual_seed(seed)
        weight_bytes = count_parameters(args) * model_dtype.itemsize // runtime.model_parallel_size
        cache_bytes = (2 * args.n_layers * max_batch_size * max_seq_len * args.kv_heads * args.head_dim
                       * model_dtype.itemsize // runtime.model_parallel_size)
        distributed.print0(
            f"Loading {info.n_shards} shard(s) from {ckpt_dir} into {runtime.model_parallel_size} process(es) "
            f"on {runtime.device.type}, {str(model_dtype).removeprefix('torch.')}: per process "
            f"{weight_bytes / 2**30:.2f} GiB of weights + {cache_bytes / 2**30:.2f} GiB of KV cache "
            f"({max_batch_size} x {max_seq_len} tokens)")

        with torch.device("meta"):
            model = Transformer(args)
        path = cpu.linear_path(runtime.device, model_dtype)
        pack = fast and path.packs
        # Packing replaces each weight by a new buffer: read tensors into buffers of their own (not one shared
        # mapping) so that each original is freed as soon as it is packed.
        state = load_rank_state(info.shards, runtime.model_parallel_rank, runtime.model_parallel_size,
                                dtype=model_dtype, device=runtime.device, mmap=not pack, progress=_report_shard)
        state.pop("rope.freqs", None)  # the rotary tables are recomputed in float32 from rope_theta
        _check_state(model, state, ckpt_dir)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        if pack:
            model.pack_for_cpu(path)
        model.setup_cache(runtime.device, model_dtype)
        model.eval()
        if runtime.device.type == "cpu":
            distributed.print0(cpu.describe(path if pack else None))
            note = cpu.dtype_note(runtime.device, model_dtype)
            if note and dtype is not None:
                distributed.print0(note)
        distributed.print0(f"Loaded in {time.perf_counter() - start:.2f} seconds")
        return Llama(model, tokenizer, seed=seed, device=runtime.device, compile=compile)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1,
                 device: Union[str, torch.device, None] = None, compile: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.sampler = torch.Generator(device=self.device).manual_seed(seed)
        self._runs = 0  # generations started; see _stream_steps
        # The decode step is the hot loop; with compile, `length` is dynamic so one graph serves every position.
        self._compiled_decode = torch.compile(model.decode, dynamic=True) if compile else None

    # --- the decode loop ---------------------------------------------------------------------------------

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]], names: Optional[Sequence[str]] = None) -> None:
        """Errors name each prompt as `names[i]` (the caller's own numbering), by default "prompt i"."""
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prompt_tokens must be a non-empty list of token lists")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size {params.max_batch_size}")
        for i, prompt in enumerate(prompt_tokens):
            name = names[i] if names else f"prompt {i}"
            if not isinstance(prompt, (list, tuple)) or not prompt:
                raise ValueError(f"{name} must be a non-empty list of token ids, got {prompt!r}")
            if len(prompt) > params.max_seq_len:
                raise ValueError(f"{name} has {len(prompt)} tokens, more than max_seq_len {params.max_seq_len}")
            bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < params.vocab_size]
            if bad:
                raise ValueError(f"{name} has token ids outside 0..{params.vocab_size - 1}: {bad[:5]}")

    def _prefill(self, prompt_tokens: Sequence[Sequence[int]],
                 prompt_logprobs: Optional[List[List[float]]]) -> torch.Tensor:
        """One packed forward pass over all prompts; the logits (B, V) at each prompt's last token.

        Logits at every prompt position are computed only when prompt log-probs are wanted (echo + logprobs);
        they are appended to `prompt_logprobs`, 0.0 first, since nothing predicts a prompt's first token.
        """
        if prompt_logprobs is None:
            return self.model.prefill(prompt_tokens)
        logits = self.model.prefill(prompt_tokens, all_logits=True)
        flat = torch.tensor([t for p in prompt_tokens for t in p], device=logits.device)
        logprobs = F.log_softmax(logits[:-1], dim=-1).gather(-1, flat[1:].unsqueeze(-1)).squeeze(-1).tolist()
        last, start = [], 0
        for prompt in prompt_tokens:
            end = start + len(prompt)
            prompt_logprobs.append([0.0] + logprobs[start:end - 1])
            last.append(end - 1)
            start = end
        return logits[last]

    def _stream_steps(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
        logprobs: bool,
        prompt_logprobs: Optional[List[List[float]]] = None,
    ) -> Iterator[_Step]:
        """Prefill all prompts in one packed pass, then yield one _Step per decoded position until all rows stop.

        A row stops at its EOS (which is yielded, so callers can drop it) or after max_gen_len tokens, or at
        max_seq_len. When prompt_logprobs is a list, the log-probability of each prompt token is appended to
        it (0.0 for the first, which nothing predicts), as `echo` needs.
        """
        self._runs += 1
        run = self._runs  # the cache is shared: a newer run makes this one's rows stale
        params = self.model.params
        lengths = torch.tensor([len(p) for p in prompt_tokens], device=self.device)
        bsz = len(prompt_tokens)
        budget = torch.clamp(params.max_seq_len - lengths, max=max_gen_len)  # tokens each row may add
        logits = self._prefill(prompt_tokens, prompt_logprobs)
        active = budget > 0
        positions = lengths.clone()  # where each row's next token goes
        produced = torch.zeros(bsz, dtype=torch.long, device=self.device)
        while bool(active.any()):
            nxt = next_token(logits, temperature, top_p, self.sampler)
            lps = F.log_softmax(logits, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1) if logprobs else None
            emitted = active.clone()
            produced += emitted.long()
            active = active & (nxt != self.tokenizer.eos_id) & (produced < budget)
            yield _Step(nxt.tolist(), emitted.tolist(), lps.tolist() if logprobs else None)
            if not bool(active.any()):
                break
            if self._runs != run:
                raise RuntimeError("another generation ran on this Llama while this one was paused (they share "
                                   "one KV cache): finish or close a stream before starting another call")
            # Finished rows keep a fixed place in the batch; they rewrite their last slot, which nobody reads.
            step_pos = torch.where(active, positions, positions - 1).clamp(max=params.max_seq_len - 1)
            decode = self._compiled_decode or self.model.decode
            logits = decode(nxt, step_pos, int(step_pos.max()) + 1)
            positions += active.long()

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt; returns the new tokens (the prompt too with echo) without EOS, and log-probs."""
        self._check_prompts(prompt_tokens)
        _check_gen_len(max_gen_len)
        check_sampling_args(temperature, top_p)
        bsz = len(prompt_tokens)
        out_tokens: List[List[int]] = [list(p) if echo else [] for p in prompt_tokens]
        out_logprobs: List[List[float]] = [[] for _ in range(bsz)]
        prompt_lps: Optional[List[List[float]]] = [] if (echo and logprobs) else None
        if max_gen_len > 0:
            for step in self._stream_steps(prompt_tokens, max_gen_len, temperature, top_p, logprobs, prompt_lps):
                for i in range(bsz):  # a row emits nothing after its EOS, and the EOS itself is left out
                    if not step.emitted[i] or step.tokens[i] == self.tokenizer.eos_id:
                        continue
                    out_tokens[i].append(step.tokens[i])
                    if logprobs:
                        out_logprobs[i].append(step.logprobs[i])
        elif prompt_lps is not None:
            self._prefill(prompt_tokens, prompt_lps)
        if prompt_lps is not None:
            out_logprobs = [p + g for p, g in zip(prompt_lps, out_logprobs)]
        return out_tokens, (out_logprobs if logprobs else None)

    # --- streaming -------------------------------------------------------------------------------------------

    def stream_generate(
        self,
        prompt_tokens: List[int],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
    ) -> Iterator[str]:
        """Yield the continuation of one prompt as text, chunk by chunk, as tokens are produced.

        The chunks join to exactly `tokenizer.decode` of the generated tokens: SentencePiece word-boundary
        spaces are kept, and bytes of a character split over byte-fallback tokens are held back until the
        character is complete. Every rank yields the same chunks, so model-parallel ranks stay in step as long
        as they all consume (or stop consuming) the stream at the same chunk. Closing the iterator early
        leaves the generator ready for the next call. One generation at a time: the KV cache is shared, so a
        stream resumed after another call ran raises RuntimeError. Arguments are checked here, at the call.
        """
        self._check_prompts([prompt_tokens])
        _check_gen_len(max_gen_len)
        check_sampling_args(temperature, top_p)
        return self._stream_text(prompt_tokens, max_gen_len, temperature, top_p)

    def _stream_text(self, prompt_tokens: List[int], max_gen_len: int, temperature: float,
                     top_p: float) -> Iterator[str]:
        if max_gen_len == 0:
            return
        generated: List[int] = []
        sent = ""
        steps = self._stream_steps([prompt_tokens], max_gen_len, temperature, top_p, logprobs=False)
        try:
            while True:
                with torch.inference_mode():  # only while computing: never across a yield, into the caller
                    step = next(steps, None)
                if step is None or step.tokens[0] == self.tokenizer.eos_id:
                    break
                generated.append(step.tokens[0])
                text = self.tokenizer.decode(generated)
                if text.endswith("\ufffd") or not text.startswith(sent) or len(text) == len(sent):
                    continue  # an incomplete UTF-8 character: wait for its remaining bytes
                chunk, sent = text[len(sent):], text
                yield chunk
        finally:
            steps.close()
        final = self.tokenizer.decode(generated)
        if len(final) > len(sent):
            yield final[len(sent):]

    def stream_text_completion(
        self,
        prompt: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
    ) -> Iterator[str]:
        """text_completion for one prompt, yielding text chunks as they are produced."""
        (tokens,) = self._encode_prompts([prompt])
        return self.stream_generate(tokens, self._default_gen_len(max_gen_len), temperature, top_p)

    def stream_chat_completion(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
    ) -> Iterator[str]:
        """chat_completion for one dialog, yielding the answer's text chunks as they are produced."""
        validate_dialog(dialog)
        if has_special_tags(dialog):
            check_sampling_args(temperature, top_p)
            return iter([UNSAFE_ERROR])
        tokens = self.formatter.encode_dialog_prompt(dialog)
        return self.stream_generate(tokens, self._default_gen_len(max_gen_len), temperature, top_p)

    # --- text and chat -----------------------------------------------------------------------------------

    def _default_gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _encode_prompts(self, prompts: Sequence[str]) -> List[List[int]]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt {i} must be a string, got {type(prompt).__name__}: {prompt!r}")
        return [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        prompt_tokens = self._encode_prompts(prompts)
        tokens, lps = self.generate(prompt_tokens, self._default_gen_len(max_gen_len), temperature, top_p,
                                    logprobs, echo)
        results: List[CompletionPrediction] = []
        for i, toks in enumerate(tokens):
            result: CompletionPrediction = {"generation": self.tokenizer.decode(toks)}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([t]) for t in toks]
                result["logprobs"] = lps[i]
            results.append(result)
        return results

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Answer each dialog. A dialog that smuggles in [INST] or <<SYS>> tags is answered with an error
        message and costs no compute; the rest of the batch is answered normally."""
        if not isinstance(dialogs, (list, tuple)) or not dialogs:
            raise ValueError(f"dialogs must be a non-empty list of dialogs, got {dialogs!r}")
        for i, dialog in enumerate(dialogs):
            validate_dialog(dialog, index=i)
        safe = [i for i, d in enumerate(dialogs) if not has_special_tags(d)]
        results: List[ChatPrediction] = [
            {"generation": {"role": "assistant", "content": UNSAFE_ERROR}, **({"tokens": [], "logprobs": []}
                                                                           if logprobs else {})}
            for _ in dialogs
        ]
        if safe:
            prompt_tokens = [self.formatter.encode_dialog_prompt(dialogs[i]) for i in safe]
            self._check_prompts(prompt_tokens, names=[f"dialog {i}" for i in safe])
            tokens, lps = self.generate(prompt_tokens, self._default_gen_len(max_gen_len), temperature, top_p,
                                        logprobs)
            for j, i in enumerate(safe):
                result: ChatPrediction = {"generation": {"role": "assistant",
                                                         "content": self.tokenizer.decode(tokens[j])}}
                if logprobs:
                    result["tokens"] = [self.tokenizer.decode([t]) for t in tokens[j]]
                    result["logprobs"] = lps[j]
                results[i] = result
        return results


def _report_shard(done: int, total: int, path, seconds: float) -> None:
    distributed.print0(f"  rank 0 read shard {done}/{total} ({path.name}) after {seconds:.1f} s")


def _check_gen_len(max_gen_len) -> None:
    if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
        raise ValueError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")


def _check_state(model: Transformer, state: dict, ckpt_dir: str) -> None:
    """Every weight the model needs, of the right shape: otherwise say which, before assigning anything."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs params.json {tuple(expected[k])}"
             for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint in {ckpt_dir!r} does not match its params.json: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")


__all__ = ["Llama", "Dialog", "Message", "CompletionPrediction", "ChatPrediction", "resolve_dtype"]
