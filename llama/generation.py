"""Llama: build a model-parallel generator from a checkpoint, then complete text and dialogs, fill in code and
moderate conversations.

`Llama.build` reads its options as a `BuildConfig` (llama/builder.py) and loads through the one `load` of
llama/checkpoints/loading.py; token generation over the engine (`generate`, `stream_generate`, the engine's
requests) is `TokenGenerator`'s (llama/token_generator.py).
This module adds what speaks text: prompts and dialogs in the family's formats, answers decoded, tool calls read.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

from . import builder, families
from .builder import BuildConfig
from .checkpoints import loading, lora_slots
from .engine import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from .engine.sampler import sample_top_p  # noqa: F401  (the released reference's public helper)
from .engine.speculative import ModelDrafter, NgramDrafter, Speculation
from .families import Family, Moderation
from .families.chat_format import UNSAFE_ERROR, Dialog, Message, validate_dialog
from .families.codellama import decode_infill, infilling_prompt
from .families.prompting import ChatPrompts
from .families.templates import ChatTemplate
from .families.tools import assistant_message, check_tools, has_tool_messages
from .model import distributed
from .model.transformer import Transformer
from .token_generator import TokenGenerator
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


class Llama(TokenGenerator):
    """A loaded model with its tokenizer and family: completes text and answers dialogs, in batches or streamed.

    Build one with `Llama.build` (on every process of a torchrun group). Generations run on the generator's
    engine, which owns the KV cache's rows: a stream left paused keeps its rows (and goes on decoding while
    other calls step the engine) until it is finished or closed.
    """

    @staticmethod
    def build(*args: Any, config: Optional[BuildConfig] = None, **options: Any) -> "Llama":
        """Load a checkpoint into this process's share of a model-parallel Transformer.

        `Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, **options)`: the arguments are
        `BuildConfig`'s fields (llama/builder.py, where each is described), by position or by name; or
        `Llama.build(config=BuildConfig(...))` (or the config alone by position), keyword options beside it
        replacing the config's. Run by every process of the group (torchrun), or alone for a one-process run.
        A bad option is a ValueError naming it before any loading.
        """
        config = builder.config_from(args, config, options)
        loaded = _load(config)
        return Llama(loaded.model, loaded.tokenizer, seed=config.seed, compile=loaded.plan.compile,
                     deterministic=loaded.plan.deterministic, family=loaded.family,
                     speculation=_speculation(config, loaded.tokenizer), prefix_cache=config.prefix_cache,
                     prefix_cache_gib=config.prefix_cache_gib, chat_template=loaded.template)

    def __init__(self, model: Transformer, tokenizer: BaseTokenizer, seed: int = 1, compile: bool = False,
                 deterministic: bool = False, family: Union[Family, str, None] = None,
                 speculation: Optional[Speculation] = None, prefix_cache: bool = True,
                 prefix_cache_gib: Optional[float] = None, chat_template: Optional[ChatTemplate] = None) -> None:
        # The family (llama/families) knows the chat format and the stop tokens; None: detected from the files.
        params = {"rope_theta": model.params.rope_theta, "use_scaled_rope": model.params.use_scaled_rope,
                  "dim": model.params.dim}
        self.family: Family = family if isinstance(family, Family) else families.detect(tokenizer, params, family)
        self.formatter = self.family.chat_format(tokenizer)
        self.prompts = ChatPrompts(self.family, tokenizer, chat_template)  # template or Meta format, tools
        super().__init__(model, tokenizer, self.family.stop_ids(tokenizer), seed=seed, compile=compile,
                         deterministic=deterministic, speculation=speculation, prefix_cache=prefix_cache,
                         prefix_cache_gib=prefix_cache_gib)

    def dialog_length(self, dialog: Dialog) -> int:
        """Tokens of a dialog's prompt in the chat format (what counts against max_seq_len)."""
        return len(self.prompts.encode(dialog))

    # --- text and chat -----------------------------------------------------------------------------------

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


def _load(config: BuildConfig, tokenizer: Optional[BaseTokenizer] = None) -> loading.LoadedModel:
    """`config`'s model through checkpoints/loading.py's one load, with its adapters kept beside the weights
    (lora={name: folder}: checked before the load, installed after it)."""
    tokenizer = Tokenizer(config.tokenizer_path) if tokenizer is None else tokenizer
    many = config.lora is not None and not isinstance(config.lora, (str, os.PathLike))
    check = (lambda args: lora_slots.check(config.lora, args, config.max_loras, config.max_lora_rank)) if many \
        else None
    loaded = loading.load(config, tokenizer, check)
    if many:
        lora_slots.install(loaded.model, config.lora, *loaded.checked, loaded.rank, loaded.plan.model_parallel_size)
    return loaded


def _speculation(config: BuildConfig, tokenizer: BaseTokenizer) -> Optional[Speculation]:
    """speculative="ngram" or a draft checkpoint's model (built as `config.draft()` says), announced."""
    if config.speculative is None:
        return None
    drafter = NgramDrafter() if config.speculative == "ngram" else ModelDrafter(_load(config.draft(), tokenizer).model)
    distributed.print0(f"Speculative decoding: {drafter.name}, up to {config.num_draft_tokens} drafts per step")
    return Speculation(drafter, config.num_draft_tokens)
