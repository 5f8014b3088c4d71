"""What a family of the Llama line is, as data plus a few methods: see llama/families/__init__.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .chat_format import ChatFormat
from ..engine.params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from ..model.args import ArchSpec, RopeScaling
from ..tokenizers import BaseTokenizer


@dataclass(frozen=True)
class HFSpec:
    """How a family's models look in Hugging Face's layout: config.json's architecture and model_type, which
    config keys carry the ArchSpec options, and the weight names (Meta's name -> Hugging Face's). The defaults
    are the Llama models' (transformers' LlamaForCausalLM); checkpoints/hf.py and hf_config.py read it."""

    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"
    hidden_act: str = "silu"
    # config.json key -> ArchSpec field
    arch_keys: Mapping[str, str] = field(default_factory=lambda: {"attention_bias": "attention_bias",
                                                                  "mlp_bias": "mlp_bias"})
    # a layer's module (inside "layers.N." / "model.layers.N."), then the top-level ones
    layer_names: Mapping[str, str] = field(default_factory=lambda: {
        "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
        "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
        "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm"})
    top_names: Mapping[str, str] = field(default_factory=lambda: {
        "tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"})

    def arch_from_config(self, config: Mapping[str, Any]) -> ArchSpec:
        """The ArchSpec a config.json asks for (each option key true or false; absent: false; a ValueError naming
        the key otherwise, the caller names the file)."""
        given = {}
        for key, option in self.arch_keys.items():
            value = config.get(key)
            if value not in (None, False, True):
                raise ValueError(f"{key} = {value!r} is not supported: it must be true or false")
            given[option] = bool(value)
        return ArchSpec(**given)

    def config_of(self, arch: ArchSpec) -> Dict[str, Any]:
        """config.json's architecture entries for a model with the options `arch`."""
        return {"architectures": [self.architecture], "model_type": self.model_type, "hidden_act": self.hidden_act,
                **{key: getattr(arch, option) for key, option in self.arch_keys.items()}}


LLAMA_HF = HFSpec()


class Family:
    """One family: its architecture options (`arch`), tokenizer kind, chat format, stop tokens, RoPE, context,
    defaults and Hugging Face layout (`hf`): the one model spec.

    Subclasses set the attributes and override what differs. Nothing outside llama/families knows which family
    a model is: it asks its Family.
    """

    name: str = ""  # the value of family= / --family
    title: str = ""  # for people: "Llama 2"
    tokenizer_kind: str = "sentencepiece"  # 'sentencepiece' or 'tiktoken' (llama.tokenizers)
    vocab_size: int = 32000  # the released vocabulary
    context_length: int = 4096  # the context it was trained for (HF's max_position_embeddings)
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None  # the published RoPE scaling, for checkpoints that ask for it
    temperature: float = DEFAULT_TEMPERATURE  # generation defaults of the released examples
    top_p: float = DEFAULT_TOP_P
    chat: bool = True  # a chat (instruct) format exists
    infilling: bool = False  # Code Llama's fill-in-the-middle
    moderation: bool = False  # Llama Guard's classification
    arch: ArchSpec = ArchSpec()  # the architecture options its models have (the Llama models: none)
    hf: HFSpec = LLAMA_HF  # its Hugging Face config keys and weight names
    hf_rope_type: Optional[str] = None  # config.json's rope_type of its RoPE scaling (Llama 3.1's: 'llama3')

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.title}>"

    # --- the tokenizer and the prompts ---------------------------------------------------------------------

    def check_tokenizer(self, tokenizer: BaseTokenizer) -> Optional[str]:
        """Why this tokenizer cannot be this family's, or None."""
        if tokenizer.kind != self.tokenizer_kind:
            return f"{self.title} needs a {self.tokenizer_kind} tokenizer, {tokenizer.path!r} is {tokenizer.kind}"
        return None

    def chat_format(self, tokenizer: BaseTokenizer) -> ChatFormat:
        return ChatFormat(tokenizer)

    def stop_ids(self, tokenizer: BaseTokenizer) -> Tuple[int, ...]:
        """The tokens that end an answer (never part of it)."""
        return (tokenizer.eos_id,)

    def infill_stop_ids(self, tokenizer: BaseTokenizer) -> Tuple[int, ...]:
        """The tokens that end a fill-in-the-middle answer (Code Llama's)."""
        return self.stop_ids(tokenizer)

    # --- the checkpoint ---------------------------------------------------------------------------------------

    def context_for(self, params: Mapping[str, Any]) -> int:
        """The context a checkpoint of this family was trained for."""
        return self.context_length

    def check_params(self, params: Mapping[str, Any]) -> Optional[str]:
        """Why params.json (Meta's keys) cannot be this family's, or None."""
        if params.get("use_scaled_rope") and self.rope_scaling is None:
            return f"use_scaled_rope is Llama 3.1's, not {self.title}'s"
        return None

    def check_arch(self, arch: ArchSpec) -> Optional[str]:
        """Why a checkpoint whose files hold the options `arch` (biases...) cannot be this family's, or None."""
        if arch != self.arch:
            return f"{self.title}'s models have {self.arch.describe()}, the files {arch.describe()}"
        return None

    def matches(self, params: Mapping[str, Any], tokenizer: BaseTokenizer) -> bool:
        """Detection: this family is the one the files describe (the first that matches wins; the architecture
        options are checked beside it, `check_arch`)."""
        return self.check_tokenizer(tokenizer) is None and self.check_params(params) is None

    # --- Hugging Face's layout ------------------------------------------------------------------------------

    def rope_from_hf(self, rope: Mapping[str, Any]) -> Dict[str, Any]:
        """params.json's keys for config.json's rope_scaling entry of `hf_rope_type` (a ValueError saying what it
        lacks)."""
        raise ValueError(f"{self.title} has no RoPE scaling")

    def rope_to_hf(self, scaling: RopeScaling) -> Dict[str, Any]:
        """config.json's rope_scaling entry for a model of this family with the RoPE scaling `scaling`."""
        raise ValueError(f"{self.title} has no RoPE scaling")

    def hf_eos_ids(self, tokenizer: BaseTokenizer) -> List[int]:
        return list(self.stop_ids(tokenizer))

    def hf_tokenizer_files(self, tokenizer: BaseTokenizer, max_position_embeddings: int) -> Dict[str, Any]:
        """tokenizer_config.json and special_tokens_map.json beside tokenizer.model (SentencePiece: what
        transformers' LlamaTokenizer reads)."""
        return {
            "tokenizer_config.json": {
                "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
                "clean_up_tokenization_spaces": False, "model_max_length": max_position_embeddings,
                "sp_model_kwargs": {}},
            "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        }
