"""The fused CPU decoding step (llama/model/fused_decode.py, llama/cpu/csrc/decode.c) against the layer-by-layer step on
the same weights and kernels, and against a float32 model. Speed is measured by benchmarks/bench_cpu.py."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_same_cached_keys, decode_against_float32, require_kernels, scatter_blocks
from llama import cpu, qkernels, quant, quantize
from llama.model.decode_step import DecodeStep
from llama.model.fused_decode import MAX_ROWS, FusedDecode, why_not
from llama.model.layers import ParallelLinear
from llama.model import ModelArgs, Transformer

CPU = torch.device("cpu")
ARGS = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=64, max_batch_size=3,
            max_seq_len=64)


def _random(args: ModelArgs, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape))
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    return model.to(dtype).eval()


def _build(precision: str, batch: int = 3, seq: int = 64) -> Transformer:
    """The random model (always the same weights) on one of the own-kernel paths."""
    require_kernels()
    model = _random(ModelArgs(**{**ARGS, "max_batch_size": batch, "max_seq_len": seq}), torch.bfloat16)
    if precision == "bfloat16":
        if not qkernels.has_avx512_bf16():
            pytest.skip("this CPU has no AVX-512 BF16: the own bfloat16 kernel runs here only in its test loop")
        model.prepare(cpu.kernel_for(CPU, torch.bfloat16, "own-bf16"))
    elif precision == "bfloat16-avx2":  # the same kernel's AVX2 loop, as on a CPU without AVX-512 BF16
        if qkernels.bf16_isa("avx2") != "avx2":
            pytest.skip("this CPU has no AVX2")
        model.prepare(lambda w: cpu.OwnBf16Linear(w, isa="avx2") if isinstance(w, torch.Tensor) else None)
    else:
        if cpu.quantized_isa() is None:
            pytest.skip("this CPU has no AVX2: quantized layers use PyTorch's operators here")
        scheme = quant.parse(precision)
        quantize.quantize_model(model, scheme)
        model.prepare(quantize.kernel_for_quantize(scheme, CPU, torch.bfloat16, isa="auto"))
    model.setup_cache(CPU, torch.bfloat16)
    assert why_not(model) is None, why_not(model)
    return model


PRECISIONS = ["int8", "int4", "bfloat16", "bfloat16-avx2"]


def _reference(precision: str, batch: int = 3, seq: int = 64) -> Transformer:
    """The independent reference: the weights each path computes with (bfloat16, or the quantized codes
    dequantized), in float32 through PyTorch's operators."""
    model = _random(ModelArgs(**{**ARGS, "max_batch_size": batch, "max_seq_len": seq}), torch.bfloat16)
    if not precision.startswith("bfloat16"):
        scheme = quant.parse(precision)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, ParallelLinear):
                    module.weight.copy_(scheme.dequantize(scheme.quantize(module.weight.data), torch.float32))
    model = model.float()
    model.setup_cache(CPU, torch.float32)
    return model


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_steps_are_as_close_to_float32_as_the_layer_by_layer_steps(precision):
    fused_model, plain_model, exact = _build(precision), _build(precision), _reference(precision)
    fused, plain = DecodeStep(fused_model, compiled=False), DecodeStep(plain_model, compiled=False, fused=False)
    assert fused.fused is not None and plain.fused is None
    prompts = [[5, 17, 3, 40, 2, 9, 11], [7, 7, 1], [60, 2, 33, 4, 8]]
    errors, _, positions = decode_against_float32(fused, plain, exact, prompts, 8)
    assert 0 < errors["fused"] <= 1.25 * errors["plain"], errors
    assert_same_cached_keys(fused_model, plain_model, positions)  # the cache rows hold the same keys and values


def test_rows_longer_than_a_piece_are_attended_in_pieces_merged_in_order():
    """decode.c attends a row in pieces of 1024 positions (over the threads) and merges them: a 2,500-position
    row is as close to float32 as the layer-by-layer step, and its logits do not depend on the other row."""
    fused_model, plain_model, exact = _build("int8", 2, 2600), _build("int8", 2, 2600), _reference("int8", 2, 2600)
    fused, plain = DecodeStep(fused_model, compiled=False), DecodeStep(plain_model, compiled=False, fused=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (2500,), generator=g).tolist(), [7, 7, 1]]
    errors, tokens, positions = decode_against_float32(fused, plain, exact, prompts, 4)
    with torch.inference_mode():
        alone = fused(tokens[:1], positions[:1])
        both = fused(tokens, positions)
    assert 0 < errors["fused"] <= 1.25 * errors["plain"], errors
    assert torch.equal(alone[0], both[0])


@pytest.mark.parametrize("precision", ["int8"])
def test_the_fused_step_reads_each_rows_scattered_blocks(precision):
    fused_model, plain_model = _build(precision), _build(precision)
    prompts = [list(range(3, 40)), [7, 7, 1], list(range(50, 70))]
    lengths = [len(p) + 6 for p in prompts]
    fused, plain = DecodeStep(fused_model, compiled=False), DecodeStep(plain_model, compiled=False, fused=False)
    with torch.inference_mode():
        for model in (fused_model, plain_model):
            scatter_blocks(model, lengths)
            model.prefill(prompts)
        tokens, positions = torch.tensor([1, 2, 3]), [len(p) for p in prompts]
        for _ in range(5):
            a, b = fused(tokens, positions), plain(tokens, positions)
            assert (a - b).norm() <= 0.05 * b.norm()
            tokens, positions = b.argmax(-1), [p + 1 for p in positions]
        # an idle row (position -1) writes into the null block only: the rows' results do not change
        held = fused_model.tables.table[1, :1]  # row 1's block
        before = fused_model.layers[0].attention.cache.k[held].clone()
        a = fused(torch.tensor([1, 5, 3]), [positions[0], -1, positions[2]])
        assert torch.equal(fused_model.layers[0].attention.cache.k[held], before)
        ref = plain(torch.tensor([1, 5, 3]), [positions[0], -1, positions[2]])
        assert (a[[0, 2]] - ref[[0, 2]]).norm() <= 0.05 * ref[[0, 2]].norm()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_rows_logits_do_not_depend_on_the_other_rows(precision):
    model = _build(precision)
    step = DecodeStep(model, compiled=False)
    with torch.inference_mode():
        model.prefill([[1, 2, 3, 4, 5, 6], [9, 8, 7]])
        both = step(torch.tensor([11, 12]), [6, 3])
        alone = step(torch.tensor([11]), [6])
    assert torch.equal(both[0], alone[0])


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_every_instruction_set_computes_the_same_step(precision):
    model = _build(precision)
    fused = FusedDecode(model)
    best = fused.isa
    outs = {}
    with torch.inference_mode():
        model.prefill([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])
        for isa in range(best + 1):
            fused.isa = isa
            outs[isa] = fused(torch.tensor([4]), [17])
    for isa, out in outs.items():
        torch.testing.assert_close(out, outs[best], atol=2e-2, rtol=2e-2)


def test_a_cache_set_up_again_is_picked_up():
    model = _build("int8")
    step = DecodeStep(model, compiled=False)
    plain = DecodeStep(model, compiled=False, fused=False)
    with torch.inference_mode():
        model.setup_cache(CPU, torch.bfloat16)  # new buffers: the fused step must write into these
        model.prefill([[4, 5, 6]])
        a = step(torch.tensor([7]), [3])
        b = plain(torch.tensor([7]), [3])
    torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)


def test_bad_calls_are_named():
    model = _build("int8")
    fused = FusedDecode(model)
    with torch.inference_mode(), pytest.raises(ValueError, match="positions \\[64\\]"):
        fused(torch.tensor([1]), [64])
    with torch.inference_mode(), pytest.raises(ValueError, match=f"1..{MAX_ROWS - 1} rows"):
        fused(torch.tensor([1, 2]), [3])


def test_models_off_the_own_kernels_decode_layer_by_layer():
    model = _random(ModelArgs(**ARGS), torch.float32)
    model.prepare()
    model.setup_cache(CPU, torch.float32)
    assert "bfloat16" in why_not(model)
    assert DecodeStep(model, compiled=False).fused is None
    with pytest.raises(ValueError, match="cannot decode through llama/cpu/csrc/decode.c: not bfloat16"):
        FusedDecode(model)


def test_a_model_feature_outside_the_list_decodes_layer_by_layer():
    """A model option decode.c does not implement (biases) is refused by the explicit feature list, by name, even
    when everything else (bfloat16, int8 on the own kernels) fits; the layers' step then runs it."""
    from llama.model import ArchSpec
    from llama.model.fused_decode import FEATURES

    require_kernels()
    if cpu.quantized_isa() is None:
        pytest.skip("this CPU has no AVX2: quantized layers use PyTorch's operators here")
    assert {"attention-bias", "mlp-bias"}.isdisjoint(FEATURES)
    model = _random(ModelArgs(**ARGS, arch=ArchSpec(attention_bias=True)), torch.bfloat16)
    scheme = quant.parse("int8")
    quantize.quantize_model(model, scheme)
    model.prepare(quantize.kernel_for_quantize(scheme, CPU, torch.bfloat16, isa="auto"))
    model.setup_cache(CPU, torch.bfloat16)
    assert why_not(model) == ("model feature(s) ['attention-bias'] not implemented by decode.c (it implements "
                              f"{sorted(FEATURES)})")
    step = DecodeStep(model, compiled=False)
    assert step.fused is None
    with pytest.raises(ValueError, match=r"decode.c: model feature\(s\) \['attention-bias'\]"):
        FusedDecode(model)


# --- LoRA adapters inside the fused step (llama/model/fused_lora.py, llama/cpu/csrc/lora.c) ------------------------

ADAPTER_RANKS = {0: (8, None), 1: (4, ("wq", "wv")), 2: (16, ("wo", "w1", "w3", "w2"))}  # slot: rank, targets
ROW_SLOTS = [0, 1, -1, 2]  # a row of each adapter and one of the base, in one step


def _factors(model: Transformer, slot: int):
    """Random PEFT-style factors of the adapter in `slot`, per Meta key: A (r, in) and scale * B (out, r)."""
    rank, targets = ADAPTER_RANKS[slot]
    g = torch.Generator().manual_seed(7 + slot)
    out = {}
    for i, layer in enumerate(model.layers):
        for parent, names in (("attention", ("wq", "wk", "wv", "wo")), ("feed_forward", ("w1", "w2", "w3"))):
            for name in names:
                if targets is None or name in targets:
                    n, k = _shapes(model)[name]
                    out[f"layers.{i}.{parent}.{name}.weight"] = (torch.randn(rank, k, generator=g) * k ** -0.5,
                                                                  torch.randn(n, rank, generator=g) * 0.3)
    return out


def _shapes(model: Transformer):
    p, attn = model.params, model.layers[0].attention
    hidden = model.layers[0].feed_forward.w2.in_features
    kv = attn.n_local_kv_heads * attn.head_dim
    return {"wq": (p.dim, p.dim), "wk": (kv, p.dim), "wv": (kv, p.dim), "wo": (p.dim, p.dim),
            "w1": (hidden, p.dim), "w3": (hidden, p.dim), "w2": (p.dim, hidden)}


def _with_banks(precision: str):
    from llama.model import lora_bank
    model = _build(precision, batch=4)
    lora = lora_bank.attach(model, slots=4, rank=16)
    for slot in ADAPTER_RANKS:
        factors = _factors(model, slot)
        lora.load(slot, f"adapter{slot}", lambda keys, f=factors: {k: v for k, v in f.items() if k in keys})
    return model, lora


def _merged_reference(precision: str, slot: int) -> Transformer:
    """The float32 reference with one adapter merged into its weights the plain way (W + scale * B @ A), written
    out here, not through lora_bank or llama.checkpoints.lora."""
    model = _reference(precision, batch=4)
    if slot < 0:
        return model
    factors = _factors(model, slot)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            for parent in ("attention", "feed_forward"):
                for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
                    key = f"layers.{i}.{parent}.{name}.weight"
                    if key in factors:
                        a, b = factors[key]
                        getattr(getattr(layer, parent), name).weight += b @ a
    return model


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_fused_steps_add_each_rows_adapter_as_the_merged_models(precision):
    """Rows of three adapters (ranks 8, 4 and 16, different targets, zero-padded in a rank-16 bank) and one base
    row in every step: the fused step keeps the fused path, agrees with the layers' path to bfloat16 rounding and
    is as close to float32 models with each adapter merged as the layers' path is."""
    (fused_model, fused_lora), (plain_model, plain_lora) = _with_banks(precision), _with_banks(precision)
    for bank in plain_lora.banks:
        bank.native = False  # the layers' path through PyTorch's masked products, not lora.c
    refs = {slot: _merged_reference(precision, slot) for slot in set(ROW_SLOTS)}
    fused, plain = DecodeStep(fused_model, compiled=False), DecodeStep(plain_model, compiled=False, fused=False)
    assert fused.fused is not None and fused.fused.takes_adapters
    prompts = [[5, 17, 3, 40, 2], [7, 7, 1, 9, 9], [60, 2, 33, 4, 8], [1, 2, 3, 4, 5]]
    errors = {"fused": 0.0, "plain": 0.0}
    with torch.inference_mode():
        for model, lora in ((fused_model, fused_lora), (plain_model, plain_lora)):
            lora.select(ROW_SLOTS, len(prompts[0]), CPU)
            model.prefill(prompts)
            lora.clear()
        for ref in refs.values():
            ref.prefill(prompts)
        tokens, positions = torch.tensor([1, 2, 3, 4]), [len(p) for p in prompts]
        calls = []
        fused.fused.lib = _Counting(fused.fused.lib, calls)
        for _ in range(6):
            want = torch.stack([refs[s].decode(tokens, torch.tensor(positions), max(positions) + 1)[i]
                                for i, s in enumerate(ROW_SLOTS)])
            fused_lora.select(ROW_SLOTS, 1, CPU)
            plain_lora.select(ROW_SLOTS, 1, CPU)
            a, b = fused(tokens, positions), plain(tokens, positions)
            fused_lora.clear()
            plain_lora.clear()
            for i in range(4):
                assert (a[i] - b[i]).norm() <= 0.05 * b[i].norm()  # bfloat16 rounding through 2 layers
                assert (a[i] - want[i]).norm() <= 0.05 * want[i].norm()
                assert (want[i] - refs[-1].decode(tokens, torch.tensor(positions), max(positions) + 1)[i]).norm() > \
                    4 * (a[i] - want[i]).norm() or ROW_SLOTS[i] < 0  # the adapter matters far above the error
            errors["fused"] += ((a - want).norm() / want.norm()).item()
            errors["plain"] += ((b - want).norm() / want.norm()).item()
            tokens, positions = want.argmax(-1), [p + 1 for p in positions]
    assert len(calls) == 6  # every step ran in decode.c
    assert 0 < errors["fused"] <= 1.25 * errors["plain"], errors


class _Counting:
    """The kernels' library, counting the fused step's calls."""

    def __init__(self, lib, calls) -> None:
        self._lib, self._calls = lib, calls

    def qk_decode_layers(self, *args):
        self._calls.append(args)
        return self._lib.qk_decode_layers(*args)


@pytest.mark.parametrize("precision", ["int8"])
def test_a_rows_adapter_term_does_not_depend_on_the_other_rows(precision):
    """Bit for bit (deterministic mode relies on it): a row alone, beside rows of other adapters, beside the
    same adapter, and the base row beside adapter rows."""
    model, lora = _with_banks(precision)
    step = DecodeStep(model, compiled=False)
    with torch.inference_mode():
        model.prefill([[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4], [3, 3, 3, 3, 3, 3]])
        outs = {}
        for name, slots in {"mixed": [2, 0, -1], "same": [2, 2, 2], "alone": [2]}.items():
            lora.select(slots, 1, CPU)
            outs[name] = step(torch.tensor([11, 12, 13][:len(slots)]), [6, 6, 6][:len(slots)])
            lora.clear()
        base = step(torch.tensor([11, 12, 13]), [6, 6, 6])
    assert torch.equal(outs["mixed"][0], outs["alone"][0]) and torch.equal(outs["same"][0], outs["alone"][0])
    assert torch.equal(outs["mixed"][2], base[2])
    assert not torch.equal(outs["mixed"][0], base[0])


def test_every_instruction_set_adds_the_same_adapter_terms():
    model, lora = _with_banks("int8")
    fused = FusedDecode(model)
    outs = {}
    with torch.inference_mode():
        lora.select(ROW_SLOTS, 6, CPU)
        model.prefill([[1, 2, 3, 4, 5, 6]] * 4)
        for isa in range(fused.isa + 1):
            lora.select(ROW_SLOTS, 1, CPU)
            fused.isa = isa
            outs[isa] = fused(torch.tensor([4, 4, 4, 4]), [6, 6, 6, 6])
        lora.clear()
    for out in outs.values():
        torch.testing.assert_close(out, outs[fused.isa], atol=2e-2, rtol=2e-2)
    assert not torch.equal(outs[fused.isa][0], outs[fused.isa][2])  # the adapter row differs from the base row


def test_the_c_term_on_the_layers_path_is_the_adapters_product():
    """fused_lora.BankTerm (lora.c for one bank, the layers' path in bfloat16) against x·A·B in float32 written
    out here, per token's adapter, for a fused wqkv-like bank of three parts, ranks padded, a base token."""
    from llama.model import lora_bank
    from llama.model.fused_lora import BankTerm
    require_kernels()
    if cpu.quantized_isa() is None:
        pytest.skip("this CPU has no AVX2: the layers' path keeps PyTorch's products")
    parts, rank, slots = [("wq", 0, 64), ("wk", 64, 32), ("wv", 96, 32)], 16, 3
    state = lora_bank.LoraSet(slots, rank)
    bank = lora_bank.LoraBank(parts, 80, 128, slots, rank, torch.bfloat16, CPU, state)
    g = torch.Generator().manual_seed(3)
    factors = {}
    for slot, r in enumerate([16, 5, 9]):
        factors[slot] = {key: (torch.randn(r, 80, generator=g), torch.randn(cols, r, generator=g) * 0.1)
                         for key, _, cols in parts}
        bank.load(slot, factors[slot])
    assert BankTerm.serves(bank)
    x = torch.randn(7, 80, generator=g).to(torch.bfloat16)
    y = torch.randn(7, 128, generator=g).to(torch.bfloat16)
    ids = [2, 0, -1, 1, 2, 2, 0]
    state.select(ids, 1, CPU)
    got = bank.add(x, y.clone())
    assert bank.native
    bank.native = False
    torch_path = bank.add(x, y.clone())
    state.clear()
    want = y.float().clone()
    for t, slot in enumerate(ids):
        for key, first, cols in parts if slot >= 0 else []:
            a, b = (f.to(torch.bfloat16).float() for f in factors[slot][key])
            want[t, first:first + cols] += x[t].float() @ a.t() @ b.t()
    assert torch.equal(got[2], y[2])  # the base token: untouched
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)  # bfloat16 roundings of h, h·B and y
    torch.testing.assert_close(got.float(), torch_path.float(), atol=0.05, rtol=0.02)
