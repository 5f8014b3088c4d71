"""The decode step whose shapes never change (issue: CUDA graphs): same tokens as the exact-window step.

On a CPU the fixed windows and the compiled step are checked for results; their speed is a GPU matter,
measured by benchmarks/bench_decode.py --device cuda."""

from __future__ import annotations

import pytest
import torch

from helpers import GQA, MHA, TOKENIZER, make_checkpoint
from llama import Llama
from llama.model.decode_step import DecodeStep, _window_for

MAX_SEQ = 600  # windows 256, 512, then 600: a generation below crosses from the first into the second


def test_window_buckets():
    assert [_window_for(n, 600, True) for n in (1, 256, 257, 512, 513, 600)] == [256, 256, 512, 512, 600, 600]
    assert _window_for(100, 64, True) == 64  # never beyond max_seq_len
    assert [_window_for(n, 600, False) for n in (1, 257)] == [1, 257]  # eager: exactly the positions in use


@pytest.fixture(scope="module", params=["mha", "gqa"])
def generator(request, tmp_path_factory):
    args = {"mha": MHA, "gqa": GQA}[request.param]
    ckpt = make_checkpoint(tmp_path_factory.mktemp(request.param), args, seed=21)
    return Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=MAX_SEQ, max_batch_size=3, device="cpu",
                       dtype="float32", compile=False)


def ragged_long_prompts():
    # 250, 200 and 30 tokens: the longest row crosses position 256 while decoding.
    return [[1] + [100 + (7 * i + j) % 500 for j in range(n - 1)] for i, n in enumerate((250, 200, 30))]


def run(generator, step: DecodeStep):
    generator.decode_step = step
    assert generator.engine.decode is step  # the generation below runs through this step
    return generator.generate(ragged_long_prompts(), max_gen_len=12, temperature=0, logprobs=True)


def test_fixed_windows_give_the_exact_window_tokens(generator):
    exact = run(generator, DecodeStep(generator.model, compiled=False))
    fixed = run(generator, DecodeStep(generator.model, compiled=False, fixed_window=True))
    assert fixed[0] == exact[0]
    torch.testing.assert_close(torch.tensor(sum(fixed[1], [])), torch.tensor(sum(exact[1], [])), atol=1e-5, rtol=0)


def test_the_step_compiles_as_one_graph_without_host_reads(generator):
    """fullgraph=True fails on any graph break, such as reading a device value on the host: the step has none."""
    model = generator.model
    step = torch.compile(model.decode, fullgraph=True, dynamic=False)
    tokens, positions = torch.tensor([5, 6, 7]), torch.tensor([3, 9, 1])
    with torch.inference_mode():
        model.prefill([[1, 2, 3, 4], list(range(1, 11)), [1, 2]])
        compiled = step(tokens, positions, 256)
        model.prefill([[1, 2, 3, 4], list(range(1, 11)), [1, 2]])
        eager = model.decode(tokens, positions, 256)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_compiled_generation_across_windows_gives_the_eager_tokens(generator, capsys):
    eager = run(generator, DecodeStep(generator.model, compiled=False))
    compiled = run(generator, DecodeStep(generator.model, compiled=True))
    assert compiled[0] == eager[0]
    torch.testing.assert_close(torch.tensor(sum(compiled[1], [])), torch.tensor(sum(eager[1], [])), atol=1e-4,
                               rtol=0)
    out = capsys.readouterr().out
    assert "Compiling the decode step" in out and "window 512 ready in" in out  # visible, and timed


def test_a_new_decode_step_keeps_the_generators_speculation(tmp_path):
    # Llama.decode_step's setter once made an engine without the drafts Llama.build set up.
    ckpt = make_checkpoint(tmp_path, MHA, seed=3)
    generator = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=64, max_batch_size=1, device="cpu",
                            dtype="float32", speculative="ngram", num_draft_tokens=3)
    assert generator.engine.speculation is generator.speculation is not None
    generator.decode_step = DecodeStep(generator.model, compiled=False)
    assert generator.engine.speculation is generator.speculation
    assert generator.engine.prefix_cache is generator.prefix_cache
