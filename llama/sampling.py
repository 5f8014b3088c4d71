"""Choosing the next token: greedy at temperature 0, otherwise temperature plus nucleus (top-p) sampling.

Every rank calls this with identical logits and an identically seeded generator, so all ranks draw the
same tokens without communicating.
"""

from __future__ import annotations

from typing import Optional

import torch


def check_sampling_args(temperature: float, top_p: float) -> None:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:  # nan fails too
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw from the smallest set of most likely tokens whose probabilities add up to at least p."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[(probs_sum - probs_sort) > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def next_token(logits: torch.Tensor, temperature: float, top_p: float,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) float logits -> (B,) token ids."""
    if temperature > 0:
        return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
    return torch.argmax(logits, dim=-1)
