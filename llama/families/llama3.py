"""Llama 3, 3.1, 3.2 and 3.3: tiktoken with 128256 tokens, header-tagged dialogs, rope_theta 500000, GQA, and
from 3.1 on the scaled RoPE of 128k contexts (use_scaled_rope); 3.2 1B and 3B tie the output to the embedding.

The dialog format, as Meta's reference encodes it: <|begin_of_text|>, then for each message
<|start_header_id|>role<|end_header_id|>\\n\\n + content (stripped) + <|eot_id|>, then the assistant's header,
which the answer follows. An answer ends at <|eot_id|> (a turn), <|eom_id|> (a tool call awaits its result) or
<|end_of_text|>. Special-token names inside a message are encoded as plain text, so no message can forge a
header: the format has no tags to refuse.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .chat_format import ChatFormat, Message, validate_dialog
from ..model.args import RopeScaling
from ..tokenizers import BaseTokenizer
from .base import Family

ROPE_THETA = 500_000.0
ROPE_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192)
VOCAB_SIZE = 128256
# Llama 3.1's RoPE scaling in config.json (transformers' rope_type 'llama3'): its key, RopeScaling's field and
# params.json's key for each factor
HF_ROPE_TYPE = "llama3"
HF_ROPE_KEYS = (("factor", "factor", "rope_scaling_factor"),
                ("low_freq_factor", "low_freq_factor", "rope_low_freq_factor"),
                ("high_freq_factor", "high_freq_factor", "rope_high_freq_factor"),
                ("original_max_position_embeddings", "old_context_len", "rope_old_context_len"))


class Llama3ChatFormat(ChatFormat):
    """Llama 3's dialog prompt (see the module docstring); the same methods as Llama 2's ChatFormat."""

    tags: Sequence[str] = ()

    def _special(self, name: str) -> int:
        return self.tokenizer.special_tokens[name]

    def encode_header(self, message: Mapping[str, str]) -> List[int]:
        return ([self._special("<|start_header_id|>")] + self.tokenizer.encode(message["role"], bos=False, eos=False)
                + [self._special("<|end_header_id|>")] + self.tokenizer.encode("\n\n", bos=False, eos=False))

    def encode_message(self, message: Mapping[str, str]) -> List[int]:
        return (self.encode_header(message) + self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
                + [self._special("<|eot_id|>")])

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> List[int]:
        """<|begin_of_text|>, every message, then the assistant's header: the tokens the answer follows."""
        validate_dialog(dialog)
        tokens = [self._special("<|begin_of_text|>")]
        for message in dialog:
            tokens += self.encode_message(message)
        return tokens + self.encode_header({"role": "assistant", "content": ""})


class Llama3(Family):
    name = "llama3"
    title = "Llama 3"
    tokenizer_kind = "tiktoken"
    vocab_size = VOCAB_SIZE
    context_length = 8192  # 3.0; 3.1 and later (use_scaled_rope): 131072
    rope_theta = ROPE_THETA
    rope_scaling = ROPE_SCALING

    hf_rope_type = HF_ROPE_TYPE

    def context_for(self, params: Mapping[str, Any]) -> int:
        return 131072 if params.get("use_scaled_rope") else self.context_length

    def rope_from_hf(self, rope: Mapping[str, Any]) -> Dict[str, Any]:
        """use_scaled_rope and the four factors; a factor that is not given is not guessed."""
        params: Dict[str, Any] = {"use_scaled_rope": True}
        for hf_key, _, meta_key in HF_ROPE_KEYS:
            if rope.get(hf_key) is None:
                raise ValueError(f"rope_type {HF_ROPE_TYPE!r} needs {hf_key}")
            params[meta_key] = rope[hf_key]
        return params

    def rope_to_hf(self, scaling: RopeScaling) -> Dict[str, Any]:
        return {"rope_type": HF_ROPE_TYPE, **{hf_key: getattr(scaling, field) for hf_key, field, _ in HF_ROPE_KEYS}}

    def chat_format(self, tokenizer: BaseTokenizer) -> ChatFormat:
        return Llama3ChatFormat(tokenizer)

    def stop_ids(self, tokenizer: BaseTokenizer) -> Tuple[int, ...]:
        names = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
        return tuple(tokenizer.special_tokens[n] for n in names)

    def hf_eos_ids(self, tokenizer: BaseTokenizer) -> List[int]:
        return [tokenizer.special_tokens[n] for n in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]

    def hf_tokenizer_files(self, tokenizer: BaseTokenizer, max_position_embeddings: int) -> Dict[str, Any]:
        """Beside Meta's tiktoken tokenizer.model (transformers converts it when tiktoken is installed)."""
        return {
            "tokenizer_config.json": {
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                "model_input_names": ["input_ids", "attention_mask"],
                "model_max_length": max_position_embeddings},
            "special_tokens_map.json": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        }


FAMILY = Llama3()
