"""The tokenizer endpoints in vLLM's shapes, which evaluation clients (lm-evaluation-harness's remote tokenizer)
read: /tokenize, /detokenize and /tokenizer_info.

    POST /tokenize       {"prompt": str, "add_special_tokens": true} or {"messages": [...], "tools": [...]}
                         -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize     {"tokens": [ids]} -> {"prompt": str}
    GET  /tokenizer_info the special tokens and context length: {"tokenizer_class", "bos_token", "eos_token", ...}
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

from fastapi import APIRouter, Request as HTTPRequest
from starlette.concurrency import run_in_threadpool

from ..generation import Llama
from .errors import bad
from .fields import get, parse_json
from .requests import chat_prompt
from .state import server
from .tools import message, request_tools


def tokenize(body: Mapping[str, Any], generator: Llama) -> Dict[str, Any]:
    """A prompt's token ids (add_special_tokens: the leading BOS, as completions add it), or a chat's (with its
    tools), in the server's chat format: its chat template or the family's Meta format (a Llama Guard's
    moderation prompt)."""
    tokenizer = generator.tokenizer
    special = get(body, "add_special_tokens", "boolean", True)
    strs = get(body, "return_token_strs", "boolean", False)
    if body.get("messages") is not None:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list of messages", param="messages", code="invalid_type")
        dialog = [message(m, i) for i, m in enumerate(messages)]
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


router = APIRouter()


async def _answer(request: HTTPRequest, work: Callable[[Mapping[str, Any], Llama], Dict[str, Any]]) -> Dict[str, Any]:
    """The checked body's answer, worked out in a worker thread (a long prompt takes a while to tokenize)."""
    state = server(request)
    await state.authorize(request)
    raw = await state.read_body(request)
    return await run_in_threadpool(lambda: work(parse_json(raw), state.generator))


@router.post("/tokenize")
async def tokenize_route(request: HTTPRequest) -> Dict[str, Any]:
    return await _answer(request, tokenize)


@router.post("/detokenize")
async def detokenize_route(request: HTTPRequest) -> Dict[str, Any]:
    return await _answer(request, detokenize)


@router.get("/tokenizer_info")
async def tokenizer_info_route(request: HTTPRequest) -> Dict[str, Any]:
    state = server(request)
    await state.authorize(request)
    return tokenizer_info(state.generator)
