"""Llama: build a model-parallel generator from a checkpoint, then complete text and dialogs.

Every method runs through the generator's `Engine` (llama/engine): prompts are added as requests, the engine
prefills them in one packed pass and decodes all rows together, each at its own position, until every request
has finished. `generate` collects the events; the streaming methods hand text on as it comes. Every process of
a torchrun group runs the same calls on identical inputs with identically seeded generators, so all ranks
draw the same tokens without communicating.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import fields, replace
from typing import Any, Deque, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypedDict, Union

import torch

from .model import distributed
from . import families
from .checkpoints import loading
from .families.chat_format import UNSAFE_ERROR, Dialog, Message, validate_dialog
from .model.decode_step import DecodeStep
from .engine import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Chunk, Engine, Finished, Request, SamplingParams
from .engine import lora_slots
from .engine.params import SEED_BITS, check_prompt
from .engine.prefix_cache import PrefixCache, check_flags as check_prefix_cache, for_model as prefix_cache_for
from .model.kv_cache import check_gib as check_kv_gib
from .model.kv_int8 import check_kv_dtype
from .engine.speculative import ModelDrafter, NgramDrafter, Speculation, check_choice
from .engine.sampler import sample_top_p  # noqa: F401  (the released reference's public helper)
from .families import Family, Moderation
from .families.codellama import decode_infill, infilling_prompt
from .families.prompting import ChatPrompts
from .families.templates import ChatTemplate, from_checkpoint, load as load_template
from .families.tools import assistant_message, check_tools, has_tool_messages
from .model.transformer import Transformer
from .tokenizer import Tokenizer
from .tokenizers import BaseTokenizer

class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # with logprobs=True: each token as text
    logprobs: List[float]  # with logprobs=True


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]
    logprobs: List[float]


class InfillingPrediction(TypedDict, total=False):
    generation: str  # the middle
    full_text: str  # prefix + middle + suffix
    tokens: List[str]
    logprobs: List[float]


_SAMPLING_OPTIONS = {f.name for f in fields(SamplingParams)} - {"max_tokens", "temperature", "top_p", "logprobs",
                                                                  "prompt_logprobs", "n", "stop"}


class Llama:
    """A loaded model with its tokenizer: completes text and answers dialogs, in batches or streamed.

    Build one with `Llama.build` (on every process of a torchrun group). Generations run on the generator's
    engine, which owns the KV cache's rows: a stream left paused keeps its rows (and goes on decoding while
    other calls step the engine) until it is finished or closed.
    """

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
        compile: Optional[bool] = None,
        fast: bool = True,
        lora: Union[str, Mapping[str, str], None] = None,
        max_loras: Optional[int] = None,
        max_lora_rank: Optional[int] = None,
        quantize: Optional[str] = None,
        group_size: Optional[int] = None,
        deterministic: bool = False,
        family: Optional[str] = None,
        speculative: Optional[str] = None,
        num_draft_tokens: int = 4,
        prefix_cache: bool = True,
        prefix_cache_gib: Optional[float] = None,
        kv_cache_gib: Optional[float] = None,
        kv_dtype: Optional[str] = None,
        chat_template: Optional[str] = None,
    ) -> "Llama":
        """Load a checkpoint into this process's share of a model-parallel Transformer.

        `ckpt_dir` is in Meta's layout (consolidated.NN.pth + params.json) or Hugging Face's (config.json +
        safetensors, such as meta-llama/Llama-2-7b-hf). `lora`: a PEFT LoRA adapter folder, merged into the
        weights as they load (the fast path for one adapter); or {name: folder, ...}, adapters kept beside the
        unmerged base and chosen per request (`text_completion(..., lora=name)`; llama/engine/lora_slots.py):
        at most `max_loras` (default: all) in memory at once, of rank up to `max_lora_rank` (default: the
        largest given).

        Run by every process of the group (torchrun), or alone for a one-process run. Any process count that
        divides the model's split dimensions works, whatever the checkpoint's shard count. device and dtype:
        None picks the best available. compile: None compiles the decode step into CUDA graphs on CUDA and
        stays eager on CPUs; True or False forces it. fast=False keeps the weights exactly in Meta's layout
        (no fused or packed products), for reading or editing them through the model; fast=True fuses them and,
        on a CPU, computes through the kernels llama.cpu picks for it (oneDNN bf16 with native bf16
        instructions, fbgemm fp16 on other x86), printing which. quantize: "int8" (one scale per output row)
        or "int4" (groups of `group_size` inputs: 32, 64 or 128, default 64) weight-only quantization of the
        linear layers at load, per process; a checkpoint written by `python -m llama.quantize` is loaded
        quantized as it is stored (see llama/quant). family: llama2, codellama, llama3 or llamaguard
        (default: detected from the files, see llama/families); it decides the chat format and stop tokens.
        deterministic: a request's tokens never depend on
        what else shares its batch (every decode step has one shape and every prompt is prefilled alone; see
        README, "What a seed promises", for its cost).
        speculative: "ngram" (prompt lookup) or a draft checkpoint folder sharing this tokenizer: decode with up
        to `num_draft_tokens` drafted tokens per step, verified in one pass; the output is plain decoding's
        (greedy: the same tokens; sampled: the same distribution). Not with deterministic mode or compile=True;
        with compile=None the decode step stays eager. See llama/engine/speculative.py.
        prefix_cache: keep the keys and values of prompts' full 16-token blocks in a pool and copy them into later
        requests that start the same way instead of prefilling them again (llama/engine/prefix_cache.py); off
        in deterministic mode. prefix_cache_gib: the most KV the prefix cache keeps, per process in GiB (default:
        the whole pool; blocks no request holds are free memory, evicted least recently used first).
        kv_cache_gib: the paged KV cache's pool per process in GiB (llama/model/kv_cache.py): requests are admitted by
        free blocks of 16 positions, max_batch_size caps the running requests and max_seq_len one request's
        context. Default: what fits beside the weights on the device, at most max_batch_size full contexts;
        the chosen size is printed. kv_dtype: None or "auto" stores keys and values in the model's dtype; "int8"
        stores them in 8 bits with a scale per position and head (llama/model/kv_int8.py): about half the memory,
        so twice the tokens in the same kv_cache_gib.
        chat_template: a Jinja chat template (a file, or the template's text) for chat prompts, rendered as
        transformers' apply_chat_template renders it; default: a Hugging Face checkpoint's own template
        (tokenizer_config.json), else the family's Meta format (llama/families/prompting.py).
        """
        start = time.perf_counter()
        loading.check_sizes(max_seq_len, max_batch_size, seed)
        check_choice(speculative)
        check_prefix_cache(prefix_cache, prefix_cache_gib)  # before any loading
        check_kv_gib(kv_cache_gib)
        kv_dtype = check_kv_dtype(kv_dtype)
        if speculative is not None:
            Speculation(NgramDrafter(), num_draft_tokens)  # checks num_draft_tokens before any loading
            if deterministic or compile:
                raise ValueError(f"speculative={speculative!r} cannot run with "
                                 f"{'deterministic=True' if deterministic else 'compile=True'}: its verification "
                                 "passes change shape from step to step")
            compile = False
        tokenizer = Tokenizer(tokenizer_path)
        found = load_template(chat_template) if chat_template is not None else from_checkpoint(ckpt_dir)
        template = ChatTemplate(found[0], tokenizer, found[1]) if found else None  # compiled before the load
        merged = lora if lora is None or isinstance(lora, (str, os.PathLike)) else None
        source, args = loading.inspect(ckpt_dir, tokenizer, max_seq_len, max_batch_size, merged, family)
        many = None if merged is not None or lora is None else lora_slots.check(lora, args, max_loras, max_lora_rank)
        if speculative not in (None, "ngram"):  # a draft checkpoint: its files and vocabulary, before loading
            loading.inspect(speculative, tokenizer, max_seq_len, max_batch_size)
        plan = loading.plan(args, model_parallel_size, device, dtype, fast, quantize, group_size,
                            source.checkpoint.scheme, compile=compile, deterministic=deterministic)
        runtime = distributed.setup(plan.model_parallel_size, plan.device)
        torch.manual_seed(seed)
        loading.announce(source, args, plan)
        model = loading.load_model(source, args, plan, runtime.model_parallel_rank, kv_cache_gib=kv_cache_gib,
                                   kv_dtype=kv_dtype)
        if many is not None:
            lora_slots.install(model, lora, *many, runtime.model_parallel_rank, plan.model_parallel_size)
        distributed.print0(f"Loaded in {time.perf_counter() - start:.2f} seconds")
        speculation = None
        if speculative == "ngram":
            speculation = Speculation(NgramDrafter(), num_draft_tokens)
        elif speculative is not None:
            draft = Llama.build(speculative, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size,
                                seed=seed, device=device, dtype=dtype, compile=False, fast=fast, prefix_cache=False,
                                kv_cache_gib=1e-6, kv_dtype=kv_dtype)  # the drafter gives it rows of its own
            speculation = Speculation(ModelDrafter(draft.model), num_draft_tokens)
        if speculation is not None:
            distributed.print0(f"Speculative decoding: {speculation.drafter.name}, up to {num_draft_tokens} "
                               "drafts per step")
        return Llama(model, tokenizer, seed=seed, compile=plan.compile, deterministic=plan.deterministic,
                     family=source.family, speculation=speculation, prefix_cache=prefix_cache,
                     prefix_cache_gib=prefix_cache_gib, chat_template=template)

    def __init__(self, model: Transformer, tokenizer: BaseTokenizer, seed: int = 1, compile: bool = False,
                 deterministic: bool = False, family: Union[Family, str, None] = None,
                 speculation: Optional[Speculation] = None, prefix_cache: bool = True,
                 prefix_cache_gib: Optional[float] = None, chat_template: Optional[ChatTemplate] = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # The family (llama/families) knows the chat format and the stop tokens; None: detected from the files.
        params = {"rope_theta": model.params.rope_theta, "use_scaled_rope": model.params.use_scaled_rope,
                  "dim": model.params.dim}
        self.family: Family = family if isinstance(family, Family) else families.detect(tokenizer, params, family)
        self.formatter = self.family.chat_format(tokenizer)
        self.prompts = ChatPrompts(self.family, tokenizer, chat_template)  # template or Meta format, tools
        self.stop_ids = frozenset(self.family.stop_ids(tokenizer))  # an answer ends at any of these
        self.device = model.rope.device
        self.deterministic = deterministic
        self._seed = seed  # the next sequence's seed: a call's first row draws as a request seeded `seed` would
        self._decode = DecodeStep(model, compiled=compile, full_window=deterministic)
        self.speculation = speculation  # drafter and counts, shared by every engine over this model (the server's)
        # The prefix cache's table, shared like the model's pool by every engine over this model (the server's).
        self.prefix_cache = _prefix_cache(model, prefix_cache, prefix_cache_gib) if not deterministic else None
        self.engine = self._engine(self._decode)

    def _engine(self, step: DecodeStep) -> Engine:
        """The one place this generator makes its engine: over `step`, with its speculation and prefix cache."""
        return Engine(step, self.tokenizer, self.stop_ids, deterministic=self.deterministic,
                      speculation=self.speculation, prefix_cache=self.prefix_cache)

    @property
    def max_seq_len(self) -> int:
        """Prompt plus generation never exceed this many tokens."""
        return self.model.params.max_seq_len

    @property
    def max_batch_size(self) -> int:
        return self.model.params.max_batch_size

    @property
    def decode_step(self) -> DecodeStep:
        """The decode step (eager or compiled) this generator runs: next-token logits for cache rows 0..B-1 at
        host-known positions. Public so that a second engine (llama.serve) reuses it, compiled graphs included."""
        return self._decode

    @decode_step.setter
    def decode_step(self, step: DecodeStep) -> None:
        """Run later calls through another decode step (eager or compiled, other windows): a new engine over
        the same model and cache, so call it between generations."""
        self._decode = step
        self.engine = self._engine(step)

    def dialog_length(self, dialog: Dialog) -> int:
        """Tokens of a dialog's prompt in the chat format (what counts against max_seq_len)."""
        return len(self.prompts.encode(dialog))

    # --- requests to the engine ----------------------------------------------------------------------------

    def _check_prompts(self, prompt_tokens: Sequence[Sequence[int]], names: Optional[Sequence[str]] = None) -> None:
        """Errors name each prompt as `names[i]` (the caller's own numbering), by default "prompt i"."""
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise ValueError("prompt_tokens must be a non-empty list of token lists")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts exceed max_batch_size {params.max_batch_size}")
        for i, prompt in enumerate(prompt_tokens):
            check_prompt(prompt, params.vocab_size, params.max_seq_len, names[i] if names else f"prompt {i}")

    def _params(self, max_gen_len: int, temperature: float, top_p: float, options: Dict[str, Any],
                logprobs: bool = False, echo: bool = False) -> SamplingParams:
        """The sampling parameters of one call, checked before any work (ValueError naming the bad one)."""
        _check_gen_len(max_gen_len)
        unknown = sorted(set(options) - _SAMPLING_OPTIONS)
        if unknown:
            raise ValueError(f"unknown sampling option {unknown[0]!r}; the options are "
                             f"{', '.join(sorted(_SAMPLING_OPTIONS))}")
        if isinstance(options.get("stop_token_ids"), list):
            options = {**options, "stop_token_ids": tuple(options["stop_token_ids"])}
        params = SamplingParams(max_tokens=max_gen_len, temperature=temperature, top_p=top_p,
                                logprobs=0 if logprobs else None, prompt_logprobs=echo and logprobs, **options)
        return params.check(self.model.params.vocab_size)

    def _next_seed(self) -> int:
        seed, self._seed = self._seed, (self._seed + 1) % 2 ** SEED_BITS
        return seed

    def _loras(self, lora: Any, n: int) -> List[Optional[str]]:
        """Each prompt's adapter: `lora` is None (the base), one name for all, or a list of n (None: the base)."""
        names = list(lora) if isinstance(lora, (list, tuple)) else [lora] * n
        if len(names) != n:
            raise ValueError(f"lora lists {len(names)} adapters for {n} prompts")
        for name in names:
            self.engine.check_lora(name)
        return names

    def _events(self, prompt_tokens: Sequence[Sequence[int]], params: SamplingParams,
                loras: Optional[Sequence[Optional[str]]] = None) -> Iterator[Tuple[int, Any]]:
        """Add each prompt as a request (its room in the context caps max_tokens) and yield (prompt index,
        event) as the engine produces them. Closing the iterator cancels what is unfinished."""
        events: Deque[Tuple[int, Any]] = deque()
        requests = []
        loras = loras or [None] * len(prompt_tokens)
        for i, prompt in enumerate(prompt_tokens):
            room = min(params.max_tokens, self.max_seq_len - len(prompt))
            seed = params.seed if params.seed is not None else self._next_seed()
            requests.append(Request(list(prompt), replace(params, max_tokens=room, seed=seed),
                                    lambda event, i=i: events.append((i, event)), id=f"call-{i}", lora=loras[i]))
        waiting, open_ = deque(requests), len(requests)
        try:
            while open_:
                while waiting and self.engine.can_add(waiting[0]):
                    self.engine.add(waiting.popleft())
                if not events:
                    self.engine.step()  # a failure ends this call's requests with 'error' events (raised below)
                while events:
                    i, event = events.popleft()
                    open_ -= isinstance(event, Finished)
                    if isinstance(event, Finished) and event.reason == "error":
                        raise RuntimeError(f"generation failed: {event.message}")
                    yield i, event
        finally:
            for request in requests:
                request.cancelled = True  # finished ones ignore it; the rest free their rows at the next step

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        logprobs: bool = False,
        echo: bool = False,
        **sampling: Any,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt; returns the new tokens (the prompt too with echo) without EOS, and log-probs.

        `sampling` takes the engine's other options: top_k, min_p, presence_penalty, frequency_penalty,
        repetition_penalty, logit_bias, seed, stop_token_ids (see llama/engine/params.py), and `lora`: the
        adapter of a model built with several (a name for every prompt, or a list with one per prompt)."""
        self._check_prompts(prompt_tokens)
        loras = self._loras(sampling.pop("lora", None), len(prompt_tokens))
        params = self._params(max_gen_len, temperature, top_p, sampling, logprobs, echo)
        out_tokens: List[List[int]] = [list(p) if echo else [] for p in prompt_tokens]
        out_logprobs: List[List[float]] = [[] for _ in prompt_tokens]
        if max_gen_len > 0 or params.prompt_logprobs:
            for i, event in self._events(prompt_tokens, params, loras):
                if isinstance(event, Chunk):
                    if event.prompt_logprobs is not None:
                        out_logprobs[i] = event.prompt_logprobs + out_logprobs[i]
                    out_tokens[i] += event.tokens
                    out_logprobs[i] += [entry.logprob for entry in event.logprobs]
        return out_tokens, (out_logprobs if logprobs else None)

    # --- streaming -------------------------------------------------------------------------------------------

    def stream_generate(
        self,
        prompt_tokens: List[int],
        max_gen_len: int,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        **sampling: Any,
    ) -> Iterator[str]:
        """Yield the continuation of one prompt as text, chunk by chunk, as tokens are produced.

        The chunks join to exactly `tokenizer.decode` of the generated tokens: SentencePiece word-boundary
        spaces are kept, and bytes of a character split over byte-fallback tokens are held back until the
        character is complete. Every rank yields the same chunks, so model-parallel ranks stay in step as long
        as they all consume (or stop consuming) the stream at the same chunk. Closing the iterator early frees
        its row. Arguments are checked here, at the call.
        """
        self._check_prompts([prompt_tokens])
        loras = self._loras(sampling.pop("lora", None), 1)
        params = self._params(max_gen_len, temperature, top_p, sampling)
        return self._stream_text(prompt_tokens, params, loras)

    def _stream_text(self, prompt_tokens: List[int], params: SamplingParams, loras=None) -> Iterator[str]:
        if params.max_tokens == 0:
            return
        events = self._events([prompt_tokens], params, loras)
        try:
            while True:
                with torch.inference_mode():  # only while computing: never across a yield, into the caller
                    item = next(events, None)
                if item is None:
                    break
                if isinstance(item[1], Chunk) and item[1].text:
                    yield item[1].text
        finally:
            events.close()

    def stream_text_completion(
        self,
        prompt: str,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        max_gen_len: Optional[int] = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """text_completion for one prompt, yielding text chunks as they are produced."""
        (tokens,) = self._encode_prompts([prompt])
        return self.stream_generate(tokens, self._default_gen_len(max_gen_len), temperature, top_p, **sampling)

    def stream_chat_completion(
        self,
        dialog: Dialog,
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        max_gen_len: Optional[int] = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """chat_completion for one dialog, yielding the answer's text chunks as they are produced."""
        if self.prompts.template is None:
            validate_dialog(dialog)
        if self.prompts.checks_tags and self.formatter.has_special_tags(dialog):
            self._params(self._default_gen_len(max_gen_len), temperature, top_p, sampling)
            return iter([UNSAFE_ERROR])
        tokens = self.prompts.encode(dialog)
        return self.stream_generate(tokens, self._default_gen_len(max_gen_len), temperature, top_p, **sampling)

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
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        **sampling: Any,
    ) -> List[CompletionPrediction]:
        """Continue each prompt (a BOS is prepended); max_gen_len None means as long as max_seq_len allows.

        Returns one {"generation": text} per prompt, with "tokens" (each as text) and "logprobs" when logprobs is
        set; echo puts the prompt's own tokens and log-probs first (the first token's log-prob is 0.0).
        """
        prompt_tokens = self._encode_prompts(prompts)
        tokens, lps = self.generate(prompt_tokens, self._default_gen_len(max_gen_len), temperature, top_p,
                                    logprobs, echo, **sampling)
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
        temperature: float = DEFAULT_TEMPERATURE,
        top_p: float = DEFAULT_TOP_P,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        tools: Optional[List[Dict[str, Any]]] = None,
        **sampling: Any,
    ) -> List[ChatPrediction]:
        """Answer each dialog. A dialog that smuggles in [INST] or <<SYS>> tags is answered with an error
        message and costs no compute; the rest of the batch is answered normally.

        tools: OpenAI's function tools ({"type": "function", "function": {"name", "description", "parameters"}});
        a dialog may then hold assistant messages with "tool_calls" and "tool" messages with their results. An
        answer that calls tools comes back as {"role": "assistant", "content": None, "tool_calls": [{"id",
        "type": "function", "function": {"name", "arguments" (JSON text)}}]} (read as vLLM's llama3_json parser
        reads answers, llama/families/tools.py)."""
        if not isinstance(dialogs, (list, tuple)) or not dialogs:
            raise ValueError(f"dialogs must be a non-empty list of dialogs, got {dialogs!r}")
        if tools is not None:
            check_tools(tools)
        plain = [tools is None and self.prompts.template is None and not has_tool_messages(d) for d in dialogs]
        for i, dialog in enumerate(dialogs):
            if plain[i]:
                validate_dialog(dialog, index=i)
        safe = [i for i, d in enumerate(dialogs) if not (plain[i] and self.formatter.has_special_tags(d))]
        results: List[ChatPrediction] = [
            {"generation": {"role": "assistant", "content": UNSAFE_ERROR}, **({"tokens": [], "logprobs": []}
                                                                           if logprobs else {})}
            for _ in dialogs
        ]
        if not safe:
            self._params(self._default_gen_len(max_gen_len), temperature, top_p, sampling, logprobs)
            return results
        prompt_tokens = [self._chat_prompt(dialogs[i], i, tools) for i in safe]
        self._check_prompts(prompt_tokens, names=[f"dialog {i}" for i in safe])
        tokens, lps = self.generate(prompt_tokens, self._default_gen_len(max_gen_len), temperature, top_p,
                                    logprobs, **sampling)
        for j, i in enumerate(safe):
            result: ChatPrediction = {"generation": assistant_message(self.tokenizer.decode(tokens[j]), tools)}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([t]) for t in tokens[j]]
                result["logprobs"] = lps[j]
            results[i] = result
        return results

    def _chat_prompt(self, dialog: Dialog, index: int, tools: Optional[List[Dict[str, Any]]]) -> List[int]:
        try:
            return self.prompts.encode(dialog, tools)
        except ValueError as err:
            raise ValueError(f"dialog {index}: {err}") from None

    # --- Code Llama's infilling and Llama Guard's moderation ----------------------------------------------------

    def text_infilling(
        self,
        prefixes: List[str],
        suffixes: List[str],
        temperature: float = 0.0,
        top_p: float = DEFAULT_TOP_P,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        suffix_first: bool = False,
    ) -> List[InfillingPrediction]:
        """Code Llama: write the code between each prefix and suffix (fill in the middle), in the PSM format of
        Meta's codellama repository (SPM with suffix_first). Returns {"generation": middle, "full_text": prefix +
        middle + suffix} per pair (with "tokens" and "logprobs" when asked)."""
        if not isinstance(prefixes, (list, tuple)) or not isinstance(suffixes, (list, tuple)) or \
                len(prefixes) != len(suffixes) or not prefixes:
            raise ValueError(f"prefixes and suffixes must be non-empty lists of the same length, got "
                             f"{len(prefixes) if isinstance(prefixes, (list, tuple)) else prefixes!r} and "
                             f"{len(suffixes) if isinstance(suffixes, (list, tuple)) else suffixes!r}")
        for name, texts in (("prefix", prefixes), ("suffix", suffixes)):
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise ValueError(f"{name} {i} must be a string, got {type(text).__name__}: {text!r}")
        prompts = [infilling_prompt(self.tokenizer, p, s, suffix_first) for p, s in zip(prefixes, suffixes)]
        self._check_prompts(prompts, names=[f"infilling prompt {i}" for i in range(len(prompts))])
        tokens, lps = self.generate(prompts, self._default_gen_len(max_gen_len), temperature, top_p, logprobs,
                                    **self.infill_stops())
        results: List[InfillingPrediction] = []
        for i, toks in enumerate(tokens):
            middle = decode_infill(self.tokenizer, toks)
            result: InfillingPrediction = {"generation": middle, "full_text": prefixes[i] + middle + suffixes[i]}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([t]) for t in toks]
                result["logprobs"] = lps[i]
            results.append(result)
        return results

    def infill_stops(self) -> Dict[str, Tuple[int, ...]]:
        """The sampling options that make a fill-in-the-middle answer end where the family's do (Code Llama:
        at ▁<EOT> only, not at EOS)."""
        stops = tuple(self.family.infill_stop_ids(self.tokenizer))
        return {"stop_token_ids": stops, "ignore_stop_ids": tuple(sorted(self.stop_ids - set(stops)))}

    def moderate(self, dialog: Dialog, categories: Optional[Sequence] = None, max_gen_len: int = 32,
                 excluded: Sequence[str] = ()) -> Moderation:
        """Llama Guard: classify a conversation's last turn (the user's message, or the assistant's answer when
        it ends with one) as safe or unsafe, with the violated categories. `categories`: names, (name,
        description) pairs or llamaguard.Category (default: the published list of this guard's version);
        `excluded`: codes (S14...) to leave out."""
        if not self.family.moderation:
            raise ValueError(f"moderate needs a Llama Guard model, this is {self.family.title}: build it with "
                             "family='llamaguard'")
        prompt = self.family.encode_prompt(self.tokenizer, dialog, categories, excluded)
        self._check_prompts([prompt], names=["the moderation prompt"])
        (tokens,), _ = self.generate([prompt], min(max_gen_len, self.max_seq_len - len(prompt)), temperature=0.0)
        return self.family.parse(self.tokenizer.decode(tokens), categories)


def _check_gen_len(max_gen_len) -> None:
    if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
        raise ValueError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")


def _prefix_cache(model: Transformer, enabled: bool, gib: Optional[float]) -> Optional[PrefixCache]:
    """The model's prefix cache (its block pool allocated), or None when it is off."""
    check_prefix_cache(enabled, gib)
    return prefix_cache_for(model, gib) if enabled and model.has_cache else None
