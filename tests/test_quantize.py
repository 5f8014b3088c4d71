"""Weight-only quantization (llama/checkpoints/quantize.py): the math, the kernels, loading, quantized checkpoints, errors.

Speed is measured by benchmarks/bench_decode.py --quantize, not here; quality is tested on the demo model's
held-out text, against the issue's bounds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import quant_worker
from helpers import GQA, MHA, TOKENIZER, make_checkpoint, run_torchrun
from llama import Llama, quantize
from llama import checkpoint as ckpt_mod
from llama.checkpoints.checkpoint import find_shards, load_rank_state, random_state
from llama.checkpoints.quantize import Int4Linear, Int8Linear, QuantizedWeight, quantize_weight
from test_demo import DEMO, HELDOUT_THRESHOLD, _fortunes

CPU = torch.device("cpu")
# The bounds on the demo's held-out loss, in nats per token over bfloat16.
INT8_BOUND, INT4_BOUND = 0.02, 0.15


def _weight(out_features=96, in_features=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    w[3] += 0.5  # a row offset from zero (asymmetric groups) and one outlier
    w[5, 7] = 2.0
    return w


def _build(ckpt, **kwargs):
    return Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=64, max_batch_size=2, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def gqa_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("q") / "gqa", GQA, 1, seed=21)


# --- the math ----------------------------------------------------------------------------------------------


def test_int8_round_trip_is_within_half_a_step_per_row():
    w = _weight()
    q = quantize_weight(w, "int8")
    assert q.qweight.dtype == torch.int8 and q.scales.shape == (96,) and q.scales.dtype == torch.bfloat16
    assert int(q.qweight.abs().max()) <= 127
    err = (q.dequantize() - w).abs()
    step = q.scales.float()[:, None]
    assert bool((err <= step * 0.5 + w.abs().amax(1, keepdim=True) * 2 ** -8).all())
    assert float(err.max() / w.abs().max()) < 0.01


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_is_within_half_a_step_per_group(group_size):
    w = _weight()
    q = quantize_weight(w, "int4", group_size)
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (96, 128)
    assert q.scales.shape == q.zeros.shape == (96, 256 // group_size) and q.group_size == group_size
    err = (q.dequantize() - w).abs().reshape(96, -1, group_size)
    bound = q.scales.float() * 0.5 + q.zeros.float().abs() * 2 ** -8 + 1e-6  # bfloat16 zeros round too
    assert bool((err <= bound[..., None]).all())
    assert float(err.max() / w.abs().max()) < 0.1


def test_nibbles_pack_and_unpack():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    packed = quantize.pack_nibbles(codes)
    assert packed.shape == (8, 32) and torch.equal(packed[:, 0] >> 4, codes[:, 0])  # even column: high nibble
    assert torch.equal(quantize.unpack_nibbles(packed), codes)


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
def test_fusing_quantized_weights_equals_quantizing_the_fused_weight(mode, group):
    parts = [_weight(64, 128, seed=s) for s in range(3)]
    fused = QuantizedWeight.concat([quantize_weight(p, mode, group) for p in parts])
    whole = quantize_weight(torch.cat(parts), mode, group)
    for name in ("qweight", "scales", "zeros"):
        a, b = getattr(fused, name), getattr(whole, name)
        assert (a is None and b is None) or torch.equal(a, b), name


def test_row_parallel_int8_scales_are_the_whole_rows():
    w = _weight()
    half = quantize_weight(w[:, 128:], "int8", row_amax=w.abs().amax(1))
    assert torch.equal(half.scales, quantize_weight(w, "int8").scales)
    assert torch.equal(half.qweight, quantize_weight(w, "int8").qweight[:, 128:])


# --- the kernels -------------------------------------------------------------------------------------------


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_linear_with_the_dequantized_weight(device, mode, group, dtype):
    if device == "cuda" and mode == "int4" and (dtype != torch.bfloat16 or torch.cuda.get_device_capability() < (8, 0)):
        pytest.skip("CUDA int4 (tinygemm) runs bfloat16 on compute capability 8.0+ only")
    w = _weight(96, 256).to(device)
    plain = quantize_weight(w, mode, group)
    kernel = (Int8Linear if mode == "int8" else Int4Linear)(plain, dtype)
    for shape in ((2, 5), (3, 20)):  # decode-sized and prefill-sized calls (CUDA int8 takes two paths)
        x = torch.randn(*shape, 256, device=device).to(dtype)
        got = kernel(x)
        expected = F.linear(x.float(), plain.dequantize())
        assert got.shape == (*shape, 96) and got.dtype == dtype
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert float((got.float() - expected).abs().max()) <= tol * float(expected.abs().max())
        assert torch.allclose(plain(x.float()), expected, atol=1e-5)  # the plain form computes the same, slowly


# --- loading -----------------------------------------------------------------------------------------------


def _prefill_logits(generator, text="The capital of France is"):
    with torch.inference_mode():
        return generator.model.prefill([generator.tokenizer.encode(text, bos=True, eos=False)])[0].float()


def test_build_quantized_stays_close_to_bfloat16(gqa_ckpt):
    ref = _build(gqa_ckpt)
    ref_logits = _prefill_logits(ref)
    prompt = [ref.tokenizer.encode("Simply put, the theory of relativity states that", bos=True, eos=False)]
    ref_tokens, _ = ref.generate(prompt, max_gen_len=8, temperature=0)
    for mode, min_cos, min_same in (("int8", 0.999, 8), ("int4", 0.97, 3)):
        gen = _build(gqa_ckpt, quantize=mode)
        layer = gen.model.layers[0]
        assert isinstance(layer.attention.wqkv.kernel, Int8Linear if mode == "int8" else Int4Linear)
        assert isinstance(gen.model.output.kernel, Int8Linear if mode == "int8" else Int4Linear)
        cos = F.cosine_similarity(_prefill_logits(gen), ref_logits, dim=-1).item()
        assert cos >= min_cos, (mode, cos)
        tokens, _ = gen.generate(prompt, max_gen_len=8, temperature=0)
        same = next((i for i, (a, b) in enumerate(zip(tokens[0], ref_tokens[0])) if a != b), len(tokens[0]))
        assert same >= min_same, (mode, tokens, ref_tokens)


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
def test_quantized_checkpoint_loads_without_requantizing_and_matches(tmp_path, gqa_ckpt, monkeypatch, mode, group):
    out = quantize.quantize_checkpoint(gqa_ckpt, tmp_path / "q", mode, group)
    params = json.loads((out / "params.json").read_text())
    assert params["quantization"] == ({"mode": "int8"} if mode == "int8" else {"mode": "int4", "group_size": 32})
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert state["layers.0.attention.wq.weight"].dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert state["output.scales"].dtype == torch.bfloat16 and state["tok_embeddings.weight"].dtype == torch.bfloat16
    assert ("layers.1.feed_forward.w2.zeros" in state) == (mode == "int4")
    at_load = _prefill_logits(_build(gqa_ckpt, quantize=mode, group_size=group))

    # Loading the quantized checkpoint quantizes nothing: its stored codes go in as they are.
    def refuse(*args, **kwargs):
        raise AssertionError("a quantized checkpoint must not be quantized again")
    monkeypatch.setattr(quantize, "quantize_weight", refuse)
    stored = _build(out)
    assert isinstance(stored.model.layers[1].feed_forward.w13.kernel, Int8Linear if mode == "int8" else Int4Linear)
    assert torch.equal(_prefill_logits(stored), at_load)
    assert torch.equal(_prefill_logits(_build(out, quantize=mode, group_size=group)), at_load)


def test_quantized_checkpoint_of_any_shard_count_gives_each_rank_the_same_slices(tmp_path):
    two = make_checkpoint(tmp_path / "two", GQA, 2, seed=5)
    one = make_checkpoint(tmp_path / "one", GQA, 1, seed=5)
    for mode, group in (("int8", None), ("int4", 32)):
        q2 = quantize.quantize_checkpoint(two, tmp_path / f"{mode}2", mode, group)  # 2 shards, like its source
        q1 = quantize.quantize_checkpoint(one, tmp_path / f"{mode}1", mode, group)
        for rank in range(2):
            a, b = (load_rank_state(find_shards(q), rank, 2) for q in (q1, q2))
            assert sorted(a) == sorted(b)
            for key in a:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (mode, rank, key)


def test_mp2_under_torchrun_quantized_checkpoint_equals_quantizing_at_load(tmp_path):
    bf16 = make_checkpoint(tmp_path / "bf16", GQA, 2, seed=8)
    int8 = quantize.quantize_checkpoint(bf16, tmp_path / "int8", "int8")
    int4 = quantize.quantize_checkpoint(bf16, tmp_path / "int4", "int4", 32, n_shards=1)
    specs = [str(int8), f"{bf16}:int8", str(int4), f"{bf16}:int4:32"]
    out = tmp_path / "out"
    proc = run_torchrun(Path(quant_worker.__file__), [str(out), *specs], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text())["results"] for r in range(2)]
    assert ranks[0] == ranks[1], "the ranks disagree"
    results = ranks[0]
    for stored, at_load in ((str(int8), f"{bf16}:int8"), (str(int4), f"{bf16}:int4:32")):
        assert results[stored] == results[at_load], f"{stored} differs from quantizing at load"
    # Two processes agree with one (bfloat16 partial sums differ in rounding only).
    for spec in (str(int8), str(int4)):
        single = quant_worker.outputs_for(spec)
        got, ref = torch.tensor(results[spec]["logits"]), torch.tensor(single["logits"])
        assert float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max()), spec
        assert results[spec]["tokens"][0][:3] == single["tokens"][0][:3], spec


def test_resharding_a_quantized_checkpoint_keeps_it(tmp_path, gqa_ckpt):
    from llama.checkpoints.reshard import reshard

    q = quantize.quantize_checkpoint(gqa_ckpt, tmp_path / "q", "int8")
    resharded = reshard(q, tmp_path / "q2", 2)
    assert json.loads((resharded / "params.json").read_text())["quantization"] == {"mode": "int8"}
    assert torch.equal(_prefill_logits(_build(resharded)), _prefill_logits(_build(q)))


def test_lora_adapter_is_merged_before_quantizing_at_load(tmp_path, gqa_ckpt):
    pytest.importorskip("peft")
    from llama.checkpoints.convert import meta_to_hf
    from test_lora import make_adapter

    hf_dir = meta_to_hf(gqa_ckpt, tmp_path / "hf", tokenizer_path=TOKENIZER)
    make_adapter(hf_dir, tmp_path / "adapter", seed=3)
    merged = _prefill_logits(_build(gqa_ckpt, lora=str(tmp_path / "adapter")))
    quantized = _prefill_logits(_build(gqa_ckpt, lora=str(tmp_path / "adapter"), quantize="int8"))
    plain = _prefill_logits(_build(gqa_ckpt, quantize="int8"))
    assert F.cosine_similarity(quantized, merged, dim=-1).item() > 0.999
    assert F.cosine_similarity(quantized, plain, dim=-1).item() < 0.99  # the adapter did change the model


# --- quality on the demo model -------------------------------------------------------------------------------


def _heldout_loss(generator) -> float:
    tok, model = generator.tokenizer, generator.model
    total, count = 0.0, 0
    with torch.inference_mode():
        for doc in _fortunes(DEMO / "heldout.txt"):
            ids = torch.tensor([tok.encode(doc, bos=True, eos=True)[:256]])
            logits = model(ids[:, :-1])
            total += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


def test_demo_heldout_loss_within_the_bounds():
    def loss(**kwargs):
        return _heldout_loss(Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), max_seq_len=256,
                                         max_batch_size=1, device="cpu", **kwargs))

    base = loss()
    int8, int4 = loss(quantize="int8"), loss(quantize="int4")
    assert math.isfinite(base) and base < HELDOUT_THRESHOLD
    assert int8 - base <= INT8_BOUND, f"int8 adds {int8 - base:.4f} nats/token (bound {INT8_BOUND})"
    assert int4 - base <= INT4_BOUND, f"int4 adds {int4 - base:.4f} nats/token (bound {INT4_BOUND})"


# --- errors ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Errors must come before any weight is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the error")
    monkeypatch.setattr(ckpt_mod.Reader, "read", refuse)  # every layout's reader reads through it


@pytest.mark.parametrize("kwargs,match", [
    (dict(quantize="int3"), r"quantize must be one of \['int8', 'int4'\] or None, got 'int3'"),
    (dict(quantize="int4", group_size=48), r"group_size must be one of \[32, 64, 128\] for int4, got 48"),
    (dict(quantize="int4", group_size=256), r"got 256"),
    (dict(quantize="int4", group_size=True), r"got True"),
    (dict(quantize="int8", group_size=64), r"group_size applies to int4 only"),
    (dict(group_size=64), r"group_size=64 needs quantize='int4'"),
    (dict(quantize="int4", group_size=128), r"group_size 128 does not divide the 448 input features of "
                                            r"layers\.0\.feed_forward\.w2.*valid group sizes here: \[32, 64\]"),
    (dict(quantize="int8", fast=False), r"quantize='int8' needs fast=True"),
    (dict(quantize="int8", dtype="float32"), r"on a CPU needs dtype bfloat16 \(--dtype bfloat16\), got torch\.float32"),
])
def test_bad_settings_are_errors_before_loading(gqa_ckpt, no_loading, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _build(gqa_ckpt, **kwargs)


def test_dtype_none_means_bfloat16_for_a_quantized_model_on_any_cpu(monkeypatch):
    """A CPU without AVX2 runs unquantized models in float32 by default, but the int8/int4 CPU kernels take
    bfloat16 activations only: with quantization, dtype=None is bfloat16 there too, with no contrary note."""
    from llama import loading

    monkeypatch.setattr(loading.cpu, "default_dtype", lambda device, cpu=None: torch.float32)
    assert loading.plan(GQA, None, "cpu", None, True).dtype == torch.float32
    for stored, mode in (({"mode": "int8"}, None), (None, "int8")):
        plan = loading.plan(GQA, None, "cpu", None, True, mode, None, stored)
        assert plan.dtype == torch.bfloat16 and plan.quantize == "int8" and plan.note is None


def test_group_size_must_divide_each_ranks_slice():
    quantize.check_layers(GQA, 1, "int4", 64)
    with pytest.raises(ValueError, match=r"224 input features of layers\.0\.feed_forward\.w2 on each of 2 "
                                         r"process\(es\).*valid group sizes here: \[32\]"):
        quantize.check_layers(GQA, 2, "int4", 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a PyTorch build without CUDA kernels")
def test_a_device_without_the_kernel_is_an_error():
    with pytest.raises(ValueError, match=r"needs torch\.ops\.aten\._weight_int4pack_mm on cuda"):
        quantize.kernel_for_quantize("int4", "cuda", torch.bfloat16, 64)
    with pytest.raises(ValueError, match=r"runs on cpu and cuda only, not on device 'mps'"):
        quantize.kernel_for_quantize("int8", "mps", torch.bfloat16)


def test_quantized_checkpoint_errors(tmp_path, gqa_ckpt, no_loading):
    q = tmp_path / "q"
    q.mkdir()
    (q / "params.json").write_text(json.dumps({**GQA.to_params(vocab_size=-1),
                                                "quantization": {"mode": "int8"}}))
    torch.save({"tok_embeddings.weight": torch.zeros(GQA.vocab_size, GQA.dim, dtype=torch.bfloat16)},
               q / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"quantized \(int8, group_size None\); it cannot be loaded as "
                                         r"quantize='int4'"):
        _build(q, quantize="int4")
    with pytest.raises(ValueError, match=r"LoRA adapter cannot be merged into the quantized weights"):
        _build(q, lora=str(tmp_path))
    with pytest.raises(ValueError, match=r"the checkpoint is quantized \(int8\) and needs fast=True"):
        _build(q, fast=False)
    with pytest.raises(ValueError, match=r"already quantized"):
        quantize.quantize_checkpoint(q, tmp_path / "again", "int4")
    (q / "params.json").write_text(json.dumps({**GQA.to_params(vocab_size=-1),
                                                "quantization": {"mode": "int4", "group_size": 100}}))
    with pytest.raises(ValueError, match=r"params\.json: group_size must be one of \[32, 64, 128\]"):
        _build(q)


def test_cli(tmp_path, gqa_ckpt, capsys):
    from llama.programs import quantize as program  # `python -m llama quantize`, llama-quantize

    assert program.main([str(gqa_ckpt), str(tmp_path / "q"), "--mode", "int4", "--group_size", "64"]) == 0
    assert "done" in capsys.readouterr().out
    # Never written over; bad values are one-line errors with exit status 2.
    assert program.main([str(gqa_ckpt), str(tmp_path / "q"), "--mode", "int8"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert program.main([str(gqa_ckpt), str(tmp_path / "r"), "--mode", "int4", "--group_size", "100"]) == 2
    assert "group_size must be one of" in capsys.readouterr().err
    assert program.main([str(gqa_ckpt), str(tmp_path / "s"), "--mode", "int4", "--mp", "3"]) == 2
    assert "valid process counts" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())
