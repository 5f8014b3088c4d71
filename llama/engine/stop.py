"""Stop strings over streamed text: text is handed on only once it cannot be the start of a stop string."""

from __future__ import annotations

from typing import Sequence, Tuple


class StopText:
    """Cuts a stream of text chunks at the first occurrence of any stop string (which is left out).

    A stop string may arrive split over several chunks, so the tail of the text that could still grow into
    one is held back until the next chunk decides; `flush` hands it out when the stream ends otherwise.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, chunk: str) -> Tuple[str, bool]:
        """(text safe to hand out, whether a stop string was reached: the stream ends there)."""
        text = self.held + chunk
        if not self.stops:
            self.held = ""
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
