"""A family defined in this one file, registered with no edit anywhere else in the library: Llama.build takes it
by name, the server serves it and convert writes its Hugging Face files with its stop tokens. Its models also
differ in an architecture option (biases on every linear layer, Family.arch): the model, the readers of both
layouts and the converter take it from the family, and transformers' LlamaForCausalLM (attention_bias,
mlp_bias) computes the same log-probs from the converted files."""

from __future__ import annotations

import json
from typing import Tuple

import pytest

from dataclasses import replace

from helpers import MHA, TOKENIZER, make_checkpoint
from llama import Llama, families
from llama.families.base import Family
from llama.model import ArchSpec
from llama.tokenizers import BaseTokenizer

httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e \".[test]\"")
pytest.importorskip("fastapi", reason="fastapi is not installed: pip install -e \".[serve]\"")


class Toy(Family):
    """A SentencePiece family whose answers also end at '!' (as no built-in family's do), with biases."""

    name = "toy"
    title = "Toy"
    arch = ArchSpec(attention_bias=True, mlp_bias=True)

    def stop_ids(self, tokenizer: BaseTokenizer) -> Tuple[int, ...]:
        return (tokenizer.eos_id, tokenizer.encode("!", bos=False, eos=False)[-1])


@pytest.fixture(scope="module")
def toy():
    saved = (dict(families.FAMILIES), families.NAMES, families._DETECTION_ORDER)
    family = families.register(Toy(), detect_first=False)  # chosen by name, as Llama Guard is
    yield family
    families.FAMILIES.clear()
    families.FAMILIES.update(saved[0])
    families.NAMES, families._DETECTION_ORDER = saved[1], saved[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt", replace(MHA, arch=Toy.arch))


def _bang(tokenizer) -> int:
    return tokenizer.encode("!", bos=False, eos=False)[-1]


def test_a_registered_family_loads_by_name(toy, ckpt):
    generator = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=64, max_batch_size=1, device="cpu",
                            family="toy")
    assert generator.family is toy
    assert generator.model.layers[0].attention.wo.bias is not None  # the family's option, in the model
    assert generator.stop_ids == {generator.tokenizer.eos_id, _bang(generator.tokenizer)}
    with pytest.raises(ValueError, match="taken"):
        families.register(Toy())


def test_a_registered_family_is_served(toy, ckpt):
    from llama.programs.serve import parse_args
    from serve_support import TIMEOUT, ThreadServer

    assert parse_args(["--family", "toy"]).family == "toy"  # the server's flag takes it
    generator = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=64, max_batch_size=1, device="cpu",
                            family="toy")
    with ThreadServer(generator, model="toy") as server:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=TIMEOUT,
                       json={"model": "toy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_registered_family_is_converted(toy, ckpt, tmp_path):
    from llama.checkpoints.convert import meta_to_hf
    from llama.tokenizer import Tokenizer

    meta_to_hf(ckpt, tmp_path / "hf", tokenizer_path=TOKENIZER, family="toy")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    tokenizer = Tokenizer(str(TOKENIZER))
    assert config["eos_token_id"] == [tokenizer.eos_id, _bang(tokenizer)]  # the family's own stop tokens


def test_a_family_option_must_fit_the_files(toy, ckpt, tmp_path):
    """The biased checkpoint is no Llama 2's, and the toy family needs biases: errors naming both, before loading."""
    with pytest.raises(ValueError, match=r"family 'llama2' does not fit .*Llama 2's models have no biases, the "
                                         r"files attention_bias, mlp_bias"):
        Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=64, max_batch_size=1, device="cpu", family="llama2")
    plain = make_checkpoint(tmp_path / "plain", MHA)
    with pytest.raises(ValueError, match=r"Toy's models have attention_bias, mlp_bias, the files no biases"):
        Llama.build(str(plain), str(TOKENIZER), max_seq_len=64, max_batch_size=1, device="cpu", family="toy")


def test_the_family_option_matches_transformers(toy, ckpt, tmp_path):
    """Converted to Hugging Face's layout, the toy checkpoint is a LlamaForCausalLM with attention_bias and
    mlp_bias for transformers (the independent reference): the same float32 log-probs, from our Meta and our
    Hugging Face readers alike."""
    transformers = pytest.importorskip("transformers")
    import torch
    from llama.checkpoints.convert import meta_to_hf
    from test_family_parity import check_logprobs

    meta_to_hf(ckpt, tmp_path / "hf", tokenizer_path=TOKENIZER, family="toy")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["attention_bias"], config["mlp_bias"]) == (True, True)
    reference = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    for folder in (ckpt, tmp_path / "hf"):
        ours = Llama.build(str(folder), str(TOKENIZER), max_seq_len=64, max_batch_size=2, device="cpu",
                           dtype="float32", family="toy")
        check_logprobs(ours, reference)


def test_the_family_option_on_two_processes_matches_one(toy, tmp_path):
    """Split over two processes (a column-parallel bias sliced with its rows, a row-parallel one added once after
    the sum), the biased toy model generates what one process does."""
    import torch
    from helpers import ROOT, run_torchrun
    from mp_worker import generate_for

    folder = make_checkpoint(tmp_path / "ckpt", replace(MHA, arch=Toy.arch), n_shards=2)
    proc = run_torchrun(ROOT / "tests" / "mp_worker.py", [str(tmp_path / "out"), str(folder), "--register",
                                                          "test_family_plugin:Toy", "--family", "toy"],
                        nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = generate_for(str(folder), family="toy")
    for rank in range(2):
        got = json.loads((tmp_path / "out" / f"rank{rank}.json").read_text())["results"][str(folder)]
        assert got["tokens"] == reference["tokens"]
        torch.testing.assert_close(torch.tensor(sum(got["logprobs"], [])),
                                   torch.tensor(sum(reference["logprobs"], [])), atol=1e-4, rtol=0)
