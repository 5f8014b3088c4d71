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

from . import distributed, families, loading
from .chat_format import UNSAFE_ERROR, Dialog, Message, validate_dialog
from .decode_step import DecodeStep, default_compile
from .families import Family, Moderation
from .families.codellama import decode_infill, infilling_prompt
from .model import Transformer
from .sampling import check_sampling_args, next_token
from .tokenizer import TextStream, Tokenizer
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


@dataclass
class _Step:
    """One decode step for the whole batch: each row's new token, whether the row produced it, its log-prob."""

    tokens: List[int]
    emitted: List[bool]
    logprobs: Optional[List[float]]


class Llama:
    """A loaded model with its tokenizer: completes text and answers dialogs, in batches or streamed.

    Build one with `Llama.build` (on every process of a torchrun group). Calls run one at a time: the KV cache is
    shared by the rows of a batch, so a generation must finish (or its stream be closed) before the next.
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
        lora: Optional[str] = None,
        quantize: Optional[str] = None,
        group_size: Optional[int] = None,
        family: Optional[str] = None,
    ) -> "Llama":
        """Load a checkpoint into this process's share of a model-parallel Transformer.

        `ckpt_dir` is in Meta's layout (consolidated.NN.pth + params.json) or Hugging Face's (config.json +
        safetensors, such as meta-llama/Llama-2-7b-hf). `lora`: a PEFT LoRA adapter folder, merged into the
        weights as they load.

        Run by every process of the group (torchrun), or alone for a one-process run. Any process count that
        divides the model's split dimensions works, whatever the checkpoint's shard count. device and dtype:
        None picks the best available. compile: None compiles the decode step into CUDA graphs on CUDA and
        stays eager on CPUs; True or False forces it. fast=False keeps the weights exactly in Meta's layout
        (no fused or packed products), for reading or editing them through the model; fast=True fuses them and,
        on a CPU, computes through the kernels llama.cpu picks for it (oneDNN bf16 with native bf16
        instructions, fbgemm fp16 on other x86), printing which. quantize: "int8" (one scale per output row)
        or "int4" (groups of `group_size` inputs: 32, 64 or 128, default 64) weight-only quantization of the
        linear layers at load, per process; a checkpoint written by `python -m llama.quantize` is loaded
        quantized as it is stored (see llama/quantize.py). family: llama2, codellama, llama3 or llamaguard
        (default: detected from the files, see llama/families); it decides the chat format and stop tokens.
        """
        start = time.perf_counter()
        loading.check_sizes(max_seq_len, max_batch_size, seed)
        tokenizer = Tokenizer(tokenizer_path)
        source, args = loading.inspect(ckpt_dir, tokenizer, max_seq_len, max_batch_size, lora, family)
        plan = loading.plan(args, model_parallel_size, device, dtype, fast, quantize, group_size,
                            source.info.quantization)
        compiled = default_compile(plan.device, compile)
        runtime = distributed.setup(plan.model_parallel_size, plan.device)
        plan.device = runtime.device
        torch.manual_seed(seed)
        loading.announce(source, args, plan)
        model = loading.load_model(source, args, plan, runtime.model_parallel_rank)
        distributed.print0(f"Loaded in {time.perf_counter() - start:.2f} seconds")
        return Llama(model, tokenizer, seed=seed, compile=compiled, family=source.family)

    def __init__(self, model: Transformer, tokenizer: BaseTokenizer, seed: int = 1, compile: bool = False,
                 family: Union[Family, str, None] = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # The family (llama/families) knows the chat format and the stop tokens; None: detected from the files.
        params = {"rope_theta": model.params.rope_theta, "use_scaled_rope": model.params.use_scaled_rope}
        self.family: Family = family if isinstance(family, Family) else families.detect(tokenizer, params, family)
        self.formatter = self.family.chat_format(tokenizer)
        self.stop_ids = frozenset(self.family.stop_ids(tokenizer))  # an answer ends at any of these
        self.device = model.rope.device
        self.sampler = torch.Generator(device=self.device).manual_seed(seed)
        self._runs = 0  # generations started; see _stream_steps
        self._decode = DecodeStep(model, compiled=compile)

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
        host-known positions. Public so that a scheduler (llama.serve) reuses it, compiled graphs included."""
        return self._decode

    def dialog_length(self, dialog: Dialog) -> int:
        """Tokens of a dialog's prompt in the chat format (what counts against max_seq_len)."""
        return len(self.formatter.encode_dialog_prompt(dialog))

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
        max_seq_len, stop = self.max_seq_len, self.stop_ids  # family seam: the family's stop tokens
        positions = [len(p) for p in prompt_tokens]  # where each row's next token goes
        budget = [min(max_seq_len - n, max_gen_len) for n in positions]  # tokens each row may add
        produced = [0] * len(prompt_tokens)
        active = [b > 0 for b in budget]
        logits = self._prefill(prompt_tokens, prompt_logprobs)
        while any(active):
            nxt = next_token(logits, temperature, top_p, self.sampler)
            lps = F.log_softmax(logits, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1) if logprobs else None
            tokens, emitted = nxt.tolist(), active
            produced = [n + a for n, a in zip(produced, emitted)]
            active = [a and t not in stop and n < b for a, t, n, b in zip(emitted, tokens, produced, budget)]
            yield _Step(tokens, emitted, lps.tolist() if logprobs else None)
            if not any(active):
                break
            if self._runs != run:
                raise RuntimeError("another generation ran on this Llama while this one was paused (they share "
                                   "one KV cache): finish or close a stream before starting another call")
            # Finished rows keep their place in the batch and rewrite their last slot, which nobody reads.
            step_pos = [min(p if a else p - 1, max_seq_len - 1) for p, a in zip(positions, active)]
            logits = self._decode(nxt, step_pos)
            positions = [p + a for p, a in zip(positions, active)]

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
                    if not step.emitted[i] or step.tokens[i] in self.stop_ids:  # family seam
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
        text = TextStream(self.tokenizer)
        steps = self._stream_steps([prompt_tokens], max_gen_len, temperature, top_p, logprobs=False)
        try:
            while True:
                with torch.inference_mode():  # only while computing: never across a yield, into the caller
                    step = next(steps, None)
                if step is None or step.tokens[0] in self.stop_ids:  # family seam
                    break
                chunk = text.push(step.tokens[0])
                if chunk:
                    yield chunk
        finally:
            steps.close()
        rest = text.finish()
        if rest:
            yield rest

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
        if self.formatter.has_special_tags(dialog):
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
        """Continue each prompt (a BOS is prepended); max_gen_len None means as long as max_seq_len allows.

        Returns one {"generation": text} per prompt, with "tokens" (each as text) and "logprobs" when logprobs is
        set; echo puts the prompt's own tokens and log-probs first (the first token's log-prob is 0.0).
        """
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
        safe = [i for i, d in enumerate(dialogs) if not self.formatter.has_special_tags(d)]
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

    # --- Code Llama's infilling and Llama Guard's moderation ----------------------------------------------------

    def text_infilling(
        self,
        prefixes: List[str],
        suffixes: List[str],
        temperature: float = 0.0,
        top_p: float = 0.9,
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
        tokens, lps = self.generate(prompts, self._default_gen_len(max_gen_len), temperature, top_p, logprobs)
        results: List[InfillingPrediction] = []
        for i, toks in enumerate(tokens):
            middle = decode_infill(self.tokenizer, toks)
            result: InfillingPrediction = {"generation": middle, "full_text": prefixes[i] + middle + suffixes[i]}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([t]) for t in toks]
                result["logprobs"] = lps[i]
            results.append(result)
        return results

    def moderate(self, dialog: Dialog, categories: Optional[Sequence] = None, max_gen_len: int = 32) -> Moderation:
        """Llama Guard: classify a conversation's last turn (the user's message, or the assistant's answer when
        it ends with one) as safe or unsafe, with the violated categories. `categories`: names, (name,
        description) pairs or llamaguard.Category (default: the published list of this guard's version)."""
        if not self.family.moderation:
            raise ValueError(f"moderate needs a Llama Guard model, this is {self.family.title}: build it with "
                             "family='llamaguard'")
        prompt = self.family.encode_prompt(self.tokenizer, dialog, categories)
        self._check_prompts([prompt], names=["the moderation prompt"])
        (tokens,), _ = self.generate([prompt], min(max_gen_len, self.max_seq_len - len(prompt)), temperature=0.0)
        return self.family.parse(self.tokenizer.decode(tokens), categories)


def _check_gen_len(max_gen_len) -> None:
    if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
        raise ValueError(f"max_gen_len must be an integer >= 0, got {max_gen_len!r}")
