"""--shield: a Llama Guard model screening chat requests and whole chat answers (400 `content_filter`)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Dict, List

from .errors import APIError


class Shield:
    """--shield: a Llama Guard model rating chat messages before they run and whole (non-streamed) answers after;
    an unsafe rating is answered with 400 and code 'content_filter'. One rating at a time, off the event loop.
    A streamed answer reaches its client as it is written: only its messages are checked."""

    def __init__(self, guard: Any) -> None:
        self.guard = guard
        self.lock = threading.Lock()

    def _rate(self, dialog: List[Dict[str, str]]):
        with self.lock:
            return self.guard.moderate([m for m in dialog if m["role"] in ("user", "assistant") and
                                        isinstance(m.get("content"), str)])

    async def check(self, dialog: List[Dict[str, str]], what: str) -> None:
        try:
            verdict = await asyncio.to_thread(self._rate, dialog)
        except ValueError as err:  # too long for the shield's context, say
            raise APIError(400, f"the shield cannot rate {what}: {err}", code="content_filter") from None
        if not verdict.safe:
            raise APIError(400, f"refused: the shield rates {what} {verdict.describe()}", code="content_filter")
