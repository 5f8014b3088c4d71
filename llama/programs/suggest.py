"""The flag a user most likely meant when a program does not know the one typed: one rule for every program
(argparse's, the fire scripts', `python -m llama`'s commands), never a far-fetched guess."""

from __future__ import annotations

from typing import Iterable, Optional


def suggest(name: str, known: Iterable[str]) -> Optional[str]:
    """The flag a mistyped `name` most likely meant (one of `known`, as written there), or None where none is
    close enough to be a good guess. Compared without leading dashes, underscores, inner dashes and case: the same
    letters win; then the one flag that `name` begins (--temp: --temperature); then one at most 1 edit away (2
    from 8 letters on), if no other is as close. So --max_seqlen gets --max_seq_len, and --temp never --system."""
    def bare(flag: str) -> str:
        return flag.lstrip("-").replace("-", "").replace("_", "").lower()

    wanted, candidates = bare(name), {}
    for flag_name in known:
        candidates.setdefault(bare(flag_name), flag_name)
    if not wanted:
        return None
    if wanted in candidates:
        return candidates[wanted]
    starts = [flag_name for key, flag_name in candidates.items() if key.startswith(wanted)]
    if len(wanted) >= 3 and len(starts) == 1:
        return starts[0]
    ranked = sorted((_edits(wanted, key), key) for key in candidates)
    limit = 1 if len(wanted) < 8 else 2
    if ranked and ranked[0][0] <= limit and (len(ranked) == 1 or ranked[1][0] > ranked[0][0]):
        return candidates[ranked[0][1]]
    return None


def _edits(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of two neighbours that turn a into b."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def unknown_flag(name: str, known: Iterable[str]) -> str:
    """The one line for a flag the program does not have, with the closest real one when there is a good guess."""
    close = suggest(name, known)
    return f"unknown flag {name}{f'; did you mean {close}?' if close else ''} (--help lists the flags)"
