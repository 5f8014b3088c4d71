"""Many LoRA adapters beside one unmerged base, chosen per request (llama/model/lora_bank.py, checkpoints/lora_slots.py).

Three PEFT adapters (different ranks and targets) are made by peft on transformers' model of a converted random
checkpoint. In one batch mixing the three and the base, each row's logits must equal those of the model with that
adapter merged at load (`Llama.build(lora=PATH)`, within 1e-5 in float32) and PeftModel's (within 1e-4); through
the engine, greedy answers and their log-probs must match the merged models'.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict

import pytest
import torch

import hf_worker
from helpers import SHAPES, TOKENIZER, make_checkpoint
from llama import Llama, Tokenizer
from llama.checkpoints.checkpoint import random_state
from llama.checkpoints.convert import convert

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

ADAPTERS = {  # name: (rank, alpha, targets, seed)
    "a": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 1),
    "b": (8, 16, ["q_proj", "v_proj"], 2),
    "c": (2, 4, ["o_proj", "gate_proj", "up_proj", "down_proj"], 3),
}
IDS = Tokenizer(TOKENIZER).encode(hf_worker.LOGIT_PROMPT, bos=True, eos=False)
ROWS = [IDS, IDS[:1] + IDS[:0:-1], IDS[:1] + IDS[2:] + IDS[1:2], IDS]  # same length, different prompts
ROW_ADAPTERS = ["a", "b", None, "c"]


def make_adapter(hf_dir: Path, out: Path, r: int, alpha: int, targets, seed: int) -> torch.nn.Module:
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                      lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.eval()
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Dict[str, object]:
    root = tmp_path_factory.mktemp("loras")
    args = SHAPES["gqa"]
    meta = make_checkpoint(root / "meta", args, 1, state=random_state(args, seed=41))
    hf_dir = convert(meta, root / "hf", tokenizer_path=TOKENIZER)
    paths, peft_logits = {}, {}
    for name, (r, alpha, targets, seed) in ADAPTERS.items():
        paths[name] = root / name
        model = make_adapter(hf_dir, paths[name], r, alpha, targets, seed)
        with torch.no_grad():
            peft_logits[name] = {i: model(torch.tensor([row])).logits[0].float() for i, row in enumerate(ROWS)}
    return dict(meta=meta, hf=hf_dir, paths=paths, peft=peft_logits)


def build(ckpt, lora, **kw) -> Llama:
    return Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=64, max_batch_size=4, device="cpu", dtype="float32",
                       lora=lora, **kw)


@pytest.fixture(scope="module")
def many(setup) -> Llama:
    return build(setup["meta"], {n: str(p) for n, p in setup["paths"].items()})


@pytest.fixture(scope="module")
def merged(setup) -> Dict[object, Llama]:
    out = {name: build(setup["meta"], str(path)) for name, path in setup["paths"].items()}
    out[None] = build(setup["meta"], None)
    return out


def test_mixed_batch_logits_match_merged_and_peft(setup, many, merged):
    """One forward pass over four rows: adapters a, b, the base and c, all on the base's own kernels."""
    slots = many.model.lora_slots
    ids = []
    for name in ROW_ADAPTERS:
        if name is None:
            ids.append(-1)
            continue
        slot, path = slots.acquire(name)
        if path is not None:
            slots.load(slot, name, path)
        ids.append(slot)
    tokens = torch.tensor(ROWS)
    try:
        many.model.lora_set.select(ids, tokens.shape[1], tokens.device)
        with torch.inference_mode():
            got = many.model(tokens, 0)
    finally:
        many.model.lora_set.clear()
        for s in ids:
            if s >= 0:
                slots.release(s)
    for i, name in enumerate(ROW_ADAPTERS):
        with torch.inference_mode():
            want = merged[name].model(tokens[i:i + 1], 0)[0]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)
        if name is not None:
            torch.testing.assert_close(got[i], setup["peft"][name][i], atol=1e-4, rtol=0)
            assert (want - merged[None].model(tokens[i:i + 1], 0)[0]).abs().max() > 0.05  # the adapter matters


def test_engine_answers_as_the_merged_models(many, merged):
    """Packed prefill and batched decode steps mixing the adapters: greedy tokens and log-probs as merged."""
    prompts = ["The capital of France", "Once upon a time", "def fib(n):", "The capital of France"]
    got = many.text_completion(prompts, temperature=0, max_gen_len=8, logprobs=True, lora=ROW_ADAPTERS)
    for prompt, name, out in zip(prompts, ROW_ADAPTERS, got):
        (want,) = merged[name].text_completion([prompt], temperature=0, max_gen_len=8, logprobs=True)
        assert out["generation"] == want["generation"]
        torch.testing.assert_close(torch.tensor(out["logprobs"]), torch.tensor(want["logprobs"]), atol=1e-5, rtol=0)
    chat = [[{"role": "user", "content": "Hi"}]]
    assert many.chat_completion(chat, temperature=0, max_gen_len=6, lora="b") == \
        merged["b"].chat_completion(chat, temperature=0, max_gen_len=6)


def test_prefix_cache_never_shares_kv_between_adapters(many, merged):
    """The same long prompt under a, then b, then the base: each answers as its merged model (a shared block
    would carry a's keys into b's answer)."""
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 5)
    for name in ["a", "b", None, "a"]:
        (got,) = many.text_completion([prompt], temperature=0, max_gen_len=5, logprobs=True, lora=name)
        (want,) = merged[name].text_completion([prompt], temperature=0, max_gen_len=5, logprobs=True)
        torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]), atol=1e-5, rtol=0)
    assert many.prefix_cache.hits > 0  # the repeated (prompt, adapter) pairs did share


def test_one_slot_serves_several_adapters_in_turn(setup, merged):
    """max_loras=1: a batch asking for a and c waits for the slot, loads on demand, and every prompt finishes; the
    base and a prompts behind the waiting c run before it (admission.next_admissible), with the same answers."""
    gen = build(setup["meta"], {n: str(p) for n, p in setup["paths"].items()}, max_loras=1)
    prompts = ["Once upon a time", "Once upon a time", "Hello", "Hello"]
    names = ["a", "c", "a", None]
    got = gen.text_completion(prompts, temperature=0, max_gen_len=4, lora=names)
    for prompt, name, out in zip(prompts, names, got):
        assert out == merged[name].text_completion([prompt], temperature=0, max_gen_len=4)[0]
    assert gen.model.lora_slots.loads >= 2


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_deterministic_mode(setup, quantize):
    """A row's answer is bit for bit the same alone or beside rows of other adapters, a base row's too (int8: the
    fused CPU step would serve base-only steps, so deterministic mode keeps every step on the layers' path)."""
    options = {} if quantize is None else {"quantize": quantize, "dtype": "bfloat16"}
    gen = Llama.build(str(setup["meta"]), str(TOKENIZER), max_seq_len=64, max_batch_size=4, device="cpu",
                      lora={n: str(p) for n, p in setup["paths"].items()}, deterministic=True,
                      **{"dtype": "float32", **options})
    kw = dict(temperature=0, max_gen_len=6, logprobs=True)
    alone = gen.text_completion(["Once upon a time", "Hello there"], lora=["a", None], **kw)
    mixed = gen.text_completion(["Hello there", "Once upon a time", "Hi", "Hello there"], lora=["c", "a", "b", None],
                                **kw)
    assert mixed[1] == alone[0] and mixed[3] == alone[1]


def test_bad_adapters_and_names(setup, tmp_path, many):
    other = tmp_path / "other"  # an adapter of the MHA shape
    mha = make_checkpoint(tmp_path / "mha", SHAPES["mha"], 1)
    make_adapter(convert(mha, tmp_path / "mha-hf", tokenizer_path=TOKENIZER), other, 2, 4, ["q_proj"], 0)
    with pytest.raises(ValueError, match=r"made for another model|q_proj"):
        build(setup["meta"], {"a": str(setup["paths"]["a"]), "other": str(other)})
    wide = tmp_path / "wide"
    shutil.copytree(setup["paths"]["a"], wide)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["lm_head"]}))
    with pytest.raises(ValueError, match="lm_head"):
        build(setup["meta"], {"wide": str(wide)})
    with pytest.raises(ValueError, match="max_lora_rank"):
        build(setup["meta"], {"b": str(setup["paths"]["b"])}, max_lora_rank=4)
    with pytest.raises(ValueError, match="'nope' is not loaded"):
        many.text_completion(["Hi"], max_gen_len=2, lora="nope")
    with pytest.raises(ValueError, match="2 adapters for 1 prompts"):
        many.text_completion(["Hi"], max_gen_len=2, lora=["a", "b"])


def test_least_recently_used_adapter_leaves_first(setup):
    """max_loras=2 over three adapters, one request at a time: a, b, a, c loads c over b (a was used since)."""
    gen = build(setup["meta"], {n: str(p) for n, p in setup["paths"].items()}, max_loras=2)
    slots = gen.model.lora_slots
    for name in ["a", "b", "a", "c"]:
        gen.text_completion(["Hi"], temperature=0, max_gen_len=1, lora=name)
    assert slots.loads == 3 and set(slots.slot_of) == {"a", "c"}
    gen.text_completion(["Hi"], temperature=0, max_gen_len=1, lora="b")
    assert slots.loads == 4 and set(slots.slot_of) == {"c", "b"}
