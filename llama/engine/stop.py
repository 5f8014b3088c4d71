"""Stop strings over streamed text: text is handed on only once it cannot be the start of a stop string."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Tuple


class StopText:
    """Cuts a stream of text chunks where the first stop string appears in full (the stop string is left out;
    of several ending at the same character, the longest).

    A stop string may arrive split over several chunks, so the tail of the text that could still grow into one
    is held back until the next chunk decides; `flush` hands it out when the stream ends otherwise. Matching is
    linear in the text's length: each stop string has a KMP automaton whose state is the longest prefix of it
    that the text so far ends with, so every character costs one amortised step per stop string, and no more
    than the longest stop string's length minus one characters are ever held.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]  # cached: `prepare` built them when the request arrived
        self._state = [0] * len(self.stops)
        self.held = ""

    def feed(self, chunk: str) -> Tuple[str, bool]:
        """(text safe to hand out, whether a stop string was reached: the stream ends there)."""
        text = self.held + chunk
        if not self.stops:
            self.held = ""
            return text, False
        base = len(self.held)  # the automata have seen the held text already
        for i, char in enumerate(chunk):
            done = 0  # the longest stop string completed by this character
            for j, stop in enumerate(self.stops):
                k = self._state[j]
                while k and stop[k] != char:
                    k = self._fail[j][k - 1]
                if stop[k] == char:
                    k += 1
                if k == len(stop):
                    done = max(done, k)
                self._state[j] = k
            if done:  # the first stop string to appear in full (the longest, if several end here): cut before it
                self.held = ""
                return text[:base + i + 1 - done], True
        keep = max(self._state)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    @staticmethod
    def prepare(stops: Sequence[str]) -> None:
        """Build the stop strings' tables ahead (a server does so as a request arrives, off the engine thread):
        the StopText the engine makes for each choice then finds them ready."""
        for stop in stops:
            if stop:
                _failure(stop)

    def flush(self) -> str:
        out, self.held = self.held, ""
        self._state = [0] * len(self.stops)
        return out


CACHED_CHARS = 4096  # stop strings up to this long keep their tables (at most 1024 of them)


def _failure(pattern: str) -> Tuple[int, ...]:
    """KMP's table (see _table), cached for patterns up to CACHED_CHARS long."""
    return _cached(pattern) if len(pattern) <= CACHED_CHARS else _table(pattern)


@lru_cache(maxsize=1024)
def _cached(pattern: str) -> Tuple[int, ...]:
    return _table(pattern)


def _table(pattern: str) -> Tuple[int, ...]:
    """KMP's table: for each prefix of pattern, the length of its longest proper prefix that is also a suffix."""
    table = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        table[i] = k
    return tuple(table)
