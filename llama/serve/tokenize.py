"""The tokenizer endpoints in vLLM's shapes, which evaluation clients (lm-evaluation-harness's remote tokenizer)
read: /tokenize, /detokenize and /tokenizer_info.

    POST /tokenize       {"prompt": str, "add_special_tokens": true} or {"messages": [...], "tools": [...]}
                         -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize     {"tokens": [ids]} -> {"prompt": str}
    GET  /tokenizer_info the special tokens and context length: {"tokenizer_class", "bos_token", "eos_token", ...}
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from ..generation import Llama
from .protocol import _get, _message, bad, chat_prompt
from .tools import request_tools


def tokenize(body: Mapping[str, Any], generator: Llama) -> Dict[str, Any]:
    """A prompt's token ids (add_special_tokens: the leading BOS, as completions add it), or a chat's (with its
    tools), in the server's chat format: its chat template or the family's Meta format (a Llama Guard's
    moderation prompt)."""
    tokenizer = generator.tokenizer
    special = _get(body, "add_special_tokens", "boolean", True)
    strs = _get(body, "return_token_strs", "boolean", False)
    if body.get("messages") is not None:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list of messages", param="messages", code="invalid_type")
        dialog = [_message(m, i) for i, m in enumerate(messages)]
        tools, _, _ = request_tools(body, generator)
        tokens = chat_prompt(generator, dialog, tools, body)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("'prompt' must be a string (or send 'messages')", param="prompt",
                      code="invalid_type" if prompt is not None else None)
        tokens = tokenizer.encode(prompt, bos=special, eos=False)
    return {"count": len(tokens), "max_model_len": generator.max_seq_len, "tokens": tokens,
            "token_strs": [tokenizer.id_to_piece(t) for t in tokens] if strs else None}


def detokenize(body: Mapping[str, Any], generator: Llama) -> Dict[str, Any]:
    """The text of token ids (ids outside the vocabulary: 400 naming `tokens`)."""
    tokens = body.get("tokens")
    vocab = generator.model.params.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("'tokens' must be a list of token ids", param="tokens", code="invalid_type")
    if not all(0 <= t < vocab for t in tokens):
        raise bad(f"'tokens' has ids outside 0..{vocab - 1}", param="tokens")
    return {"prompt": generator.tokenizer.decode(tokens)}


def tokenizer_info(generator: Llama) -> Dict[str, Any]:
    """What a remote tokenizer client needs: the special tokens' text and the context length."""
    tokenizer = generator.tokenizer
    return {"tokenizer_class": type(tokenizer).__name__, "bos_token": tokenizer.id_to_piece(tokenizer.bos_id),
            "eos_token": tokenizer.id_to_piece(tokenizer.eos_id), "pad_token": None,
            "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            "vocab_size": generator.model.params.vocab_size, "model_max_length": generator.max_seq_len,
            "add_bos_token": True, "add_eos_token": False}
