"""Random checkpoints of each family's shape against transformers' LlamaForCausalLM, float32 log-probs within 1e-4.

Llama 3.1/3.2: GQA, rope_theta 500000, Llama 3.1's RoPE scaling (transformers' rope_type 'llama3'), tied
embeddings (a Meta checkpoint with no output weight; a Hugging Face directory saved by transformers itself with
tie_word_embeddings). Code Llama: rope_theta 1e6 and its 32016-token vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from helpers import LLAMA3_TOKENIZER, LLAMA3_VOCAB, codellama_tokenizer, make_checkpoint
from llama import Llama, ModelArgs
from llama.checkpoints.checkpoint import random_state
from llama.model import rope_tables
from test_parity import meta_to_hf

transformers = pytest.importorskip("transformers")

LLAMA31 = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=LLAMA3_VOCAB, multiple_of=32,
                    ffn_dim_multiplier=1.5, rope_theta=500000.0, use_scaled_rope=True)
# 3.2 1B's published factor is 32; a short old context puts these tiny heads' frequencies in all three bands.
LLAMA32 = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=LLAMA3_VOCAB, multiple_of=32,
                    rope_theta=500000.0, use_scaled_rope=True, rope_scaling_factor=32.0, rope_old_context_len=64)
CODELLAMA = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=32016, multiple_of=32, rope_theta=1e6)
PROMPTS = ["The quick brown fox jumps over the lazy dog " * 4, "def fib(n):\n    return n if n < 2 else"]


def hf_model(state: dict, args: ModelArgs, tied: bool):
    """transformers' model with the family's config: rope_type llama3 with the checkpoint's factors, tying."""
    model = meta_to_hf({**state, "output.weight": state.get("output.weight", state["tok_embeddings.weight"])}, args)
    config = model.config
    scaling = args.rope_scaling
    if scaling is not None:
        rope = {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
                "high_freq_factor": scaling.high_freq_factor,
                "original_max_position_embeddings": scaling.old_context_len, "rope_theta": args.rope_theta}
        if hasattr(config, "rope_parameters"):  # transformers 5
            config.rope_parameters = rope
        else:
            config.rope_scaling = rope
    config.tie_word_embeddings = tied
    fresh = transformers.LlamaForCausalLM(config).float().eval()
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    if tied:
        fresh.tie_weights()
        assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    return fresh


def check_logprobs(ours: Llama, hf) -> None:
    result = ours.text_completion(PROMPTS, temperature=0, max_gen_len=0, logprobs=True, echo=True)
    for prompt, res in zip(PROMPTS, result):
        ids = ours.tokenizer.encode(prompt, bos=True, eos=False)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].float()
        expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(torch.tensor(res["logprobs"][1:]), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("args", [LLAMA31, LLAMA32], ids=["3.1", "3.2"])
def test_rope_scaling_matches_transformers(args):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_model(random_state(args, seed=1), args, tied=False).config
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    table = rope_tables(args.head_dim, 2, args.rope_theta, args.rope_scaling)
    torch.testing.assert_close(torch.atan2(table[1, :, 1], table[1, :, 0]), inv_freq.float(), atol=1e-6, rtol=1e-5)
    plain = rope_tables(args.head_dim, 2, args.rope_theta)
    assert not torch.allclose(plain, table)  # the scaling changes something in this shape


@pytest.mark.parametrize("args, tied", [(LLAMA31, False), (LLAMA32, True)], ids=["3.1", "3.2-tied"])
def test_llama3_meta_layout_matches_transformers(tmp_path, args, tied):
    state = random_state(args, seed=3)
    if tied:
        del state["output.weight"]  # as Llama 3.2 1B and 3B: the output is the embedding
    folder = make_checkpoint(tmp_path / "ckpt", args, state=state)
    ours = Llama.build(str(folder), str(LLAMA3_TOKENIZER), max_seq_len=128, max_batch_size=2, dtype="float32")
    assert ours.family.name == "llama3"
    check_logprobs(ours, hf_model({k: v.float() for k, v in state.items()}, args, tied))


def test_llama3_tied_hf_directory_saved_by_transformers(tmp_path):
    state = {k: v.float() for k, v in random_state(LLAMA32, seed=4).items() if k != "output.weight"}
    hf = hf_model(state, LLAMA32, tied=True)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = Llama.build(str(tmp_path / "hf"), str(LLAMA3_TOKENIZER), max_seq_len=128, max_batch_size=2,
                       dtype="float32", model_parallel_size=1)
    assert ours.model.params.use_scaled_rope and ours.model.params.rope_scaling_factor == 32.0
    check_logprobs(ours, hf)


def test_codellama_matches_transformers(tmp_path):
    state = random_state(CODELLAMA, seed=5)
    folder = make_checkpoint(tmp_path / "ckpt", CODELLAMA, state=state)
    ours = Llama.build(str(folder), str(codellama_tokenizer(tmp_path)), max_seq_len=128, max_batch_size=2,
                       dtype="float32")
    assert ours.family.name == "codellama"
    check_logprobs(ours, hf_model({k: v.float() for k, v in state.items()}, CODELLAMA, tied=False))
    # Infilling end to end: the middle is whatever the model writes before ▁<EOT>, joined to prefix and suffix.
    (res,) = ours.text_infilling(["def f(x):\n    "], ["\n    return y\n"], max_gen_len=8)
    assert res["full_text"] == "def f(x):\n    " + res["generation"] + "\n    return y\n"
    prompt = [1, 32007] + ours.tokenizer.encode("def f(x):\n    ", False, False)
    tokens, _ = ours.generate([prompt + [32008] + ours.tokenizer.encode("☺\n    return y\n", False, False)[2:]
                               + [32009]], max_gen_len=8, temperature=0)
    assert res["generation"] == ours.tokenizer.decode(ours.tokenizer.encode("☺", False, False) + tokens[0])[1:]


def test_llama3_generation_stops_at_eot(tmp_path, monkeypatch):
    """An answer ends at <|eot_id|> (or <|eom_id|>, <|end_of_text|>), which is left out of the answer."""
    folder = make_checkpoint(tmp_path / "ckpt", LLAMA31, state=random_state(LLAMA31, seed=6))
    ours = Llama.build(str(folder), str(LLAMA3_TOKENIZER), max_seq_len=64, max_batch_size=1, dtype="float32")
    original = ours.model.prefill
    for stop in (128009, 128008, 128001):
        def prefill(prompts, *a, _stop=stop, **k):
            logits = original(prompts, *a, **k)
            logits[..., _stop] = 1e4  # the model "says" the stop token first
            return logits

        monkeypatch.setattr(ours.model, "prefill", prefill)
        (res,) = ours.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=5, temperature=0)
        assert res["generation"]["content"] == ""
    monkeypatch.undo()
    prompt = ours.formatter.encode_dialog_prompt([{"role": "user", "content": "hi"}])
    assert ours.tokenizer.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_moderate_needs_a_guard_and_reads_its_answer(tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path / "ckpt", LLAMA31, state=random_state(LLAMA31, seed=7))
    plain = Llama.build(str(folder), str(LLAMA3_TOKENIZER), max_seq_len=1024, max_batch_size=1)
    with pytest.raises(ValueError, match="family='llamaguard'"):
        plain.moderate([{"role": "user", "content": "hi"}])
    guard = Llama.build(str(folder), str(LLAMA3_TOKENIZER), max_seq_len=1024, max_batch_size=1,
                        family="llamaguard")
    assert guard.family.name == "llamaguard3"
    seen = []

    def generate(prompts, max_gen_len, temperature=0.6, top_p=0.9, logprobs=False, echo=False):
        seen.append(prompts[0])
        return [guard.tokenizer.encode("unsafe\nS2,S9", bos=False, eos=False)], None

    monkeypatch.setattr(guard, "generate", generate)
    verdict = guard.moderate([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}])
    assert (verdict.verdict, verdict.categories, verdict.names) == \
        ("unsafe", ["S2", "S9"], ["Non-Violent Crimes", "Indiscriminate Weapons"])
    assert "ONLY THE LAST Agent message" in guard.tokenizer.decode(seen[0])


# --- tied embeddings over any process count ---------------------------------------------------------------------

TIED = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=LLAMA3_VOCAB, multiple_of=32,
                 rope_theta=500000.0, use_scaled_rope=True)


@pytest.mark.parametrize("n_shards, world", [(1, 2), (2, 1), (2, 2)])
def test_tied_output_slices_for_any_split(tmp_path, n_shards, world):
    from llama.checkpoints.checkpoint import find_shards, load_rank_state

    state = random_state(TIED, seed=8)
    del state["output.weight"]
    folder = make_checkpoint(tmp_path / "ckpt", TIED, n_shards=n_shards, state=state)
    rows = LLAMA3_VOCAB // world
    for rank in range(world):
        got = load_rank_state(find_shards(folder), rank, world)["output.weight"]
        assert torch.equal(got, state["tok_embeddings.weight"][rank * rows:(rank + 1) * rows])


def test_tied_llama3_on_two_processes_matches_one(tmp_path):
    import json

    from helpers import ROOT, run_torchrun
    from mp_worker import generate_for

    state = random_state(TIED, seed=9)
    del state["output.weight"]
    folder = make_checkpoint(tmp_path / "ckpt", TIED, n_shards=2, state=state)
    proc = run_torchrun(ROOT / "tests" / "mp_worker.py", [str(tmp_path / "out"), str(folder), "--tokenizer",
                                                          str(LLAMA3_TOKENIZER)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = generate_for(str(folder), tokenizer=str(LLAMA3_TOKENIZER))
    for rank in range(2):
        got = json.loads((tmp_path / "out" / f"rank{rank}.json").read_text())["results"][str(folder)]
        assert got["tokens"] == reference["tokens"]
        torch.testing.assert_close(torch.tensor(sum(got["logprobs"], [])),
                                   torch.tensor(sum(reference["logprobs"], [])), atol=1e-4, rtol=0)


def test_quantized_tied_llama3_stays_close_to_bfloat16(tmp_path):
    """int8 weight-only quantization (the tied output included) of a Llama 3.2-shaped model: its logits stay
    near the unquantized model's in the same dtype (bfloat16: PyTorch's CPU int8 kernels' activations), as
    tests/test_quantize.py asks of Llama 2."""
    import torch.nn.functional as F

    from llama.checkpoints.quantize import Int8Linear

    state = random_state(LLAMA32, seed=10)
    del state["output.weight"]
    folder = make_checkpoint(tmp_path / "ckpt", LLAMA32, state=state)
    logits = []
    for quantize in (None, "int8"):
        model = Llama.build(str(folder), str(LLAMA3_TOKENIZER), max_seq_len=128, max_batch_size=2,
                            dtype="bfloat16", quantize=quantize)
        with torch.inference_mode():
            logits.append(model.model.prefill([model.tokenizer.encode(PROMPTS[1], bos=True, eos=False)])[0].float())
    assert isinstance(model.model.output.kernel, Int8Linear)
    assert F.cosine_similarity(logits[0], logits[1], dim=-1).item() >= 0.999
