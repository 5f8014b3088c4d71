"""On a CUDA machine: the GPU paths give the CPU-verified results. Skipped where there is no GPU.

(Parity with transformers on CUDA is in test_parity.py, which runs every case on each available device.)"""

from __future__ import annotations

import pytest
import torch

from helpers import GQA, MHA, ROOT, TOKENIZER, make_checkpoint, run_torchrun
from llama import Llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=["mha", "gqa"])
def ckpt(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), {"mha": MHA, "gqa": GQA}[request.param], seed=4)


def prompts(n=4):
    return [[1] + list(range(200 + 29 * i, 200 + 29 * i + 20 - 4 * i)) for i in range(n)]


def generate(ckpt, dtype="float32", compile=None, n=4, gen_len=24):
    g = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=300, max_batch_size=4, device="cuda", dtype=dtype,
                    compile=compile)
    return g.generate(prompts(n), max_gen_len=gen_len, temperature=0, logprobs=True)


def test_compiled_cuda_graph_step_gives_the_eager_tokens(ckpt):
    eager, compiled = generate(ckpt, compile=False), generate(ckpt, compile=True)
    assert compiled[0] == eager[0]
    torch.testing.assert_close(torch.tensor(sum(compiled[1], [])), torch.tensor(sum(eager[1], [])), atol=1e-4,
                               rtol=0)


def test_ragged_batch_equals_one_prompt_at_a_time_on_cuda(ckpt):
    g = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=300, max_batch_size=4, device="cuda", dtype="float32")
    batch = g.generate(prompts(), max_gen_len=8, temperature=0, logprobs=True)
    for i, prompt in enumerate(prompts()):
        single = g.generate([prompt], max_gen_len=8, temperature=0, logprobs=True)
        assert batch[0][i] == single[0][0]
        torch.testing.assert_close(torch.tensor(batch[1][i]), torch.tensor(single[1][0]), atol=1e-4, rtol=0)


def test_cuda_matches_cpu_in_float32(ckpt):
    cuda = generate(ckpt)
    cpu = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=300, max_batch_size=4, device="cpu",
                      dtype="float32").generate(prompts(), max_gen_len=24, temperature=0, logprobs=True)
    assert cuda[0] == cpu[0]
    torch.testing.assert_close(torch.tensor(sum(cuda[1], [])), torch.tensor(sum(cpu[1], [])), atol=1e-4, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_match_one(ckpt, tmp_path):
    import json

    proc = run_torchrun(ROOT / "tests" / "mp_worker.py", [str(tmp_path), str(ckpt), "--device", "cuda"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["results"] == ranks[1]["results"]
    import mp_worker

    single = mp_worker.generate_for(str(ckpt), device="cuda")
    assert ranks[0]["results"][str(ckpt)]["tokens"] == single["tokens"]
