"""Numerical parity with an independent implementation: Hugging Face transformers' LlamaForCausalLM.

Random weights are written in Meta's layout, loaded by `Llama.build`, and converted independently into the
Hugging Face layout by benchmarks/hf_reference.py (shared with the benchmarks that time the two side by side).
Both run in float32.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from llama import Llama, ModelArgs
from llama.checkpoints.checkpoint import random_state

from helpers import ROOT, SHAPES, TOKENIZER, make_checkpoint

# benchmarks/ is not a package (and `benchmarks` may name an unrelated installed one): load the file itself.
_spec = importlib.util.spec_from_file_location("hf_reference", ROOT / "benchmarks" / "hf_reference.py")
hf_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_reference)
meta_to_hf = hf_reference.meta_to_hf

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time",
    "Grouped-query attention shares keys and values between heads. 42 × 7 = 294; 😀 世界",
]
GEN_LEN = 12


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CASES = [pytest.param((shape, device), id=f"{shape}-{device}", marks=[CUDA] if device == "cuda" else [])
         for device in ("cpu", "cuda") for shape in sorted(SHAPES)]


@pytest.fixture(scope="module", params=CASES)
def pair(request, tmp_path_factory):
    """This library (on CUDA with its default, the compiled CUDA-graph decode step) and transformers, float32."""
    shape, device = request.param
    args = SHAPES[shape]
    state = random_state(args, seed=7)
    folder = make_checkpoint(tmp_path_factory.mktemp(shape), args, state=state)
    ours = Llama.build(str(folder), str(TOKENIZER), max_seq_len=128, max_batch_size=len(PROMPTS),
                       device=device, dtype="float32")
    return ours, meta_to_hf(state, args).to(device)


def test_prompt_logprobs_match_transformers(pair):
    ours, hf = pair
    result = ours.text_completion(PROMPTS, temperature=0, max_gen_len=0, logprobs=True, echo=True)
    for prompt, res in zip(PROMPTS, result):
        ids = ours.tokenizer.encode(prompt, bos=True, eos=False)
        with torch.no_grad():
            logits = hf(torch.tensor([ids], device=hf.device)).logits[0].float().cpu()
        expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
        got = torch.tensor(res["logprobs"])
        assert got.shape[0] == len(ids)
        assert got[0] == 0.0  # nothing predicts the first token
        torch.testing.assert_close(got[1:], expected, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers(pair):
    ours, hf = pair
    prompt_tokens = [ours.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    # One ragged batch through our generator: prefill at once, each row at its own position.
    tokens, _ = ours.generate(prompt_tokens, max_gen_len=GEN_LEN, temperature=0)
    for ids, got in zip(prompt_tokens, tokens):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids], device=hf.device), max_new_tokens=GEN_LEN, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        expected = out[0, len(ids):].tolist()
        if 2 in expected:  # our generator stops at EOS and leaves it out
            expected = expected[: expected.index(2)]
        assert got == expected


def test_generated_logprobs_match_transformers(pair):
    """Log-probs reported for generated tokens equal the reference model's on the full sequence."""
    ours, hf = pair
    (res,) = ours.text_completion(PROMPTS[:1], temperature=0, max_gen_len=GEN_LEN, logprobs=True, echo=True)
    ids = ours.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    gen_ids = ours.generate([ids], max_gen_len=GEN_LEN, temperature=0)[0][0]
    full = ids + gen_ids
    with torch.no_grad():
        logits = hf(torch.tensor([full], device=hf.device)).logits[0].float().cpu()
    expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(full[1:]).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(torch.tensor(res["logprobs"][1:]), expected, atol=1e-4, rtol=0)
