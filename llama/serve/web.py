"""The web chat page: Gradio's ChatInterface over the server's own engine, answers streamed as they come.

It keeps the conversation, has a system-prompt box (and a temperature slider), and a stop button that cancels
the answer (its row is freed at the next step). The page is mounted on the API server at /web
(`python -m llama.serve --web`, or `python -m llama.web`), so chat and API share one model and one batch.
Gradio is kept offline: no analytics, no share links, no web fonts (the system's fonts are used).
"""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import Any, AsyncIterator, Dict, List, Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
from fastapi import APIRouter, FastAPI  # noqa: E402
from fastapi.responses import PlainTextResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from ..families.chat_format import UNSAFE_ERROR  # noqa: E402
from .completion_routes import EventStream  # noqa: E402
from .errors import APIError  # noqa: E402
from .limits import AUTH_DELAY  # noqa: E402
from .requests import chat_job  # noqa: E402
from ..engine import Chunk  # noqa: E402
from ..engine.params import DEFAULT_TEMPERATURE, RANGES  # noqa: E402
from .scheduler import QueueFull, Scheduler, Unavailable  # noqa: E402

PATH = "/web"


def _text(content: Any) -> str:
    """A chat message's text, whatever shape Gradio gives it (a string, a text part, a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") if isinstance(content.get("text"), str) else ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


class ChatPage:
    """The answer function behind the page: a dialog in, the growing answer out, oldest turns dropped when
    the conversation outgrows the context (a quarter of it stays free for the answer)."""

    def __init__(self, engine: Scheduler, model: str) -> None:
        self.engine = engine
        self.model = model
        self.answer_room = max(1, engine.max_seq_len // 4)

    def dialog(self, message: str, history: List[Dict[str, Any]], system: str) -> List[Dict[str, str]]:
        turns = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in history
                 if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
        turns = _pairs(turns)
        head = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
        user = [{"role": "user", "content": message}]
        limit = self.engine.max_seq_len - self.answer_room
        lengths = self.engine.generator.dialog_length
        while turns and lengths(head + turns + user) > limit:
            turns = turns[2:]
        return head + turns + user

    async def respond(self, message: str, history: List[Dict[str, Any]], system: str = "",
                      temperature: float = DEFAULT_TEMPERATURE) -> AsyncIterator[str]:
        message = _text(message)
        if not message.strip():
            return
        # Tokenizing the conversation takes a while for a long one: a worker thread does it, not the event loop.
        dialog = await run_in_threadpool(self.dialog, message, history, system)
        body = {"messages": dialog, "temperature": float(temperature)}
        try:
            job = await run_in_threadpool(chat_job, body, self.engine.generator, self.model)
        except APIError as err:
            yield UNSAFE_ERROR if err.code == "special_tags" else f"Error: {err.message}"
            return
        stream = EventStream(self.engine, job)
        try:
            stream.submit()
        except (QueueFull, Unavailable) as err:
            raise gr.Error(f"The server is busy, try again shortly ({err}).") from None
        text = ""
        try:
            async for event in stream:
                if isinstance(event, Chunk):
                    if event.text:
                        text += event.text
                        yield text
                elif event.reason == "error":
                    raise gr.Error(event.message)
        finally:  # the stop button (or a closed tab) cancels this generator: free the row
            stream.cancel()


def _pairs(turns: List[Dict[str, str]]) -> List[Dict[str, str]]:
    """Complete user/assistant pairs only (an answer stopped before its first word leaves a lone user turn)."""
    out: List[Dict[str, str]] = []
    for t in turns:
        if t["role"] == ("user", "assistant")[len(out) % 2]:
            out.append(t)
        elif t["role"] == "user":  # a user turn left without an answer: replace it
            out[-1] = t
    return out[:len(out) - len(out) % 2]


def build_page(engine: Scheduler, model: str) -> gr.Blocks:
    page = ChatPage(engine, model)
    return gr.ChatInterface(
        page.respond,
        title=f"Llama chat: {model}",
        additional_inputs=[
            gr.Textbox(label="System prompt", placeholder="e.g. Answer briefly.", lines=2, elem_id="system-prompt"),
            gr.Slider(RANGES["temperature"].low, RANGES["temperature"].high, value=DEFAULT_TEMPERATURE, step=0.05,
                      label="Temperature", elem_id="temperature"),
        ],
        additional_inputs_accordion=gr.Accordion("System prompt and settings", open=True),
        textbox=gr.Textbox(placeholder="Type a message and press Enter", elem_id="message", show_label=False,
                           submit_btn=True, stop_btn=True),
        chatbot=gr.Chatbot(elem_id="chat", height=480, show_label=False),
        submit_btn=True,
        stop_btn=True,
        concurrency_limit=None,  # every chat may run at once: the engine batches them and bounds the queue
        analytics_enabled=False,
    )


router = APIRouter()


@router.get(PATH, include_in_schema=False)
def _slashless() -> PlainTextResponse:
    """The page's address without its slash: a relative redirect (Starlette's own would be built from Host), with
    a body that says where, for a client that does not follow it (curl without -L)."""
    return PlainTextResponse(f"The chat page is at {PATH}/ (this address with a slash).\n", status_code=307,
                             headers={"Location": PATH + "/"})


def mount(app: FastAPI, engine: Optional[Scheduler] = None, model: Optional[str] = None,
          api_key: Optional[str] = None) -> None:
    """Serve the page at /web on `app` (with an API key set, the page asks for it as its password). engine, model
    and api_key default to the app's own (its state, serve/state.py)."""
    state = getattr(app.state, "server", None)
    if engine is None:
        engine, model, api_key = state.engine, state.model, state.api_key
    auth = None
    if api_key:
        async def auth(user: str, password: str) -> bool:
            if hmac.compare_digest(password.encode(), api_key.encode()):
                return True
            await asyncio.sleep(AUTH_DELAY)  # a wrong password waits, as a wrong API key does (nobody else)
            return False
    app.include_router(router)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: no web fonts fetched
    gr.mount_gradio_app(app, build_page(engine, model), path=PATH, auth=auth, ssr_mode=False, theme=theme,
                        footer_links=[], enable_monitoring=False, pwa=False, mcp_server=False,
                        auth_message="Enter any user name and the server's API key as the password.")
