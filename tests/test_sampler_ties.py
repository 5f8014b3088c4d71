"""Sampling settings that keep one token are greedy, ties included: top_k=1, min_p=1 and a nucleus that keeps one
token choose exactly the token `temperature: 0` chooses, which is NumPy's argmax (the first of tied maxima, as
NumPy documents) over bfloat16 logits with deliberate ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import MHA, TOKENIZER, make_checkpoint
from llama import Llama
from llama.engine.sampler import RowSampler, choose
from llama.engine.params import SamplingParams

ONE_TOKEN = [dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-6), dict(top_k=1, min_p=1.0, top_p=1e-6)]


def tied_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """bfloat16 logits whose maximum appears at several places in each row (and near-ties, one ulp apart)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(torch.bfloat16)
    for r in range(rows):
        top = logits[r].max()
        places = torch.randperm(vocab, generator=g)[:1 + r % 4]
        logits[r, places] = top  # tied maxima, at random places (the first often below the original's)
    return logits


@pytest.mark.parametrize("settings", ONE_TOKEN)
def test_one_token_settings_choose_argmax_with_ties(settings):
    logits = tied_logits(16, 4096, seed=3)
    reference = np.argmax(logits.float().numpy(), axis=-1).tolist()  # the first maximal index of each row
    greedy = choose(logits, [RowSampler(SamplingParams(temperature=0.0), [1], 0, torch.device("cpu"))] * 16)
    assert greedy == reference
    for seed in range(8):
        for temperature in (0.7, 1.0, 2.0):
            rows = [RowSampler(SamplingParams(temperature=temperature, **settings), [1], seed * 100 + i,
                               torch.device("cpu")) for i in range(16)]
            assert choose(logits, rows) == reference, (settings, seed, temperature)


def test_top_k_one_on_a_bfloat16_model_is_greedy(tmp_path):
    """End to end on a random bfloat16 model (whose logits tie now and then): the answers equal temperature 0's."""
    folder = make_checkpoint(tmp_path, MHA, seed=11)
    gen = Llama.build(str(folder), str(TOKENIZER), max_seq_len=64, max_batch_size=4, device="cpu", dtype="bfloat16")
    prompts = ["Hello", "Once upon a time", "a b c", "The"]
    greedy = gen.text_completion(prompts, temperature=0.0, max_gen_len=24)
    for settings in ONE_TOKEN:
        other = gen.text_completion(prompts, temperature=1.0, max_gen_len=24, **settings)
        assert [g["generation"] for g in other] == [g["generation"] for g in greedy], settings
