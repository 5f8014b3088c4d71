"""A family defined in this one file, registered with no edit anywhere else in the library: Llama.build takes it
by name, the server serves it and convert writes its Hugging Face files with its stop tokens."""

from __future__ import annotations

import json
from typing import Tuple

import pytest

from helpers import MHA, TOKENIZER, make_checkpoint
from llama import Llama, families
from llama.families.base import Family
from llama.tokenizers import BaseTokenizer

httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install -e \".[test]\"")
pytest.importorskip("fastapi", reason="fastapi is not installed: pip install -e \".[serve]\"")


class Toy(Family):
    """A SentencePiece family whose answers also end at '!' (as no built-in family's do)."""

    name = "toy"
    title = "Toy"

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
    return make_checkpoint(tmp_path_factory.mktemp("toy") / "ckpt", MHA)


def _bang(tokenizer) -> int:
    return tokenizer.encode("!", bos=False, eos=False)[-1]


def test_a_registered_family_loads_by_name(toy, ckpt):
    generator = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=64, max_batch_size=1, device="cpu",
                            family="toy")
    assert generator.family is toy
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
