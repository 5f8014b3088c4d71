"""Quantization schemes as objects (llama/quant): the registry, the exact codes and scales, and the on-disk
format of quantized checkpoints as written before the schemes existed.

The codes are checked against a straightforward computation written here from the schemes' definitions (one
row, one group at a time, no chunking or packing helpers), so any change to what is quantized shows up as an
exact mismatch, not as a tolerance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from helpers import GQA, TOKENIZER, make_checkpoint
from llama import Llama, quant, quantize
from llama.checkpoints.checkpoint import random_state
from llama.quant import Int4Grouped, Int8PerRow


def _weight(out_features: int = 48, in_features: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    w[1] += 0.3  # an offset row and an outlier
    w[2, 9] = -1.5
    return w.to(torch.bfloat16)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def reference_int8(w: torch.Tensor):
    """Per output row: scale = the row's largest magnitude / 127 (kept in bfloat16), q = round(w / scale)."""
    codes = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(w.shape[0], dtype=torch.bfloat16)
    for r in range(w.shape[0]):
        row = w[r].float()
        scale = _bf16(torch.clamp(row.abs().max(), min=1e-8) / 127)
        codes[r] = torch.clamp(torch.round(row / scale), -127, 127).to(torch.int8)
        scales[r] = scale
    return codes, scales


def reference_int4(w: torch.Tensor, group: int):
    """Per group of `group` inputs: scale = (max - min) / 15, zero = min + 8 * scale (both kept in bfloat16),
    code = round((w - (zero - 8 * scale)) / scale) in 0..15; two codes a byte, the even input high."""
    n, k = w.shape
    codes = torch.empty(n, k, dtype=torch.int32)
    scales = torch.empty(n, k // group, dtype=torch.bfloat16)
    zeros = torch.empty_like(scales)
    for r in range(n):
        for gi in range(k // group):
            x = w[r, gi * group:(gi + 1) * group].float()
            scale = _bf16(torch.clamp(x.max() - x.min(), min=1e-8) / 15)
            zero = _bf16(x.min() + 8 * scale)
            codes[r, gi * group:(gi + 1) * group] = torch.clamp(torch.round((x - (zero - 8 * scale)) / scale), 0, 15)
            scales[r, gi], zeros[r, gi] = scale, zero
    packed = (codes[:, 0::2] * 16 + codes[:, 1::2]).to(torch.uint8)
    return packed, scales, zeros


# --- the registry ----------------------------------------------------------------------------------------


def test_names_parse_once_into_schemes():
    assert quant.parse("int8") == Int8PerRow()
    assert quant.parse("int4") == Int4Grouped(64) == Int4Grouped()
    assert quant.parse("int4", 32) == Int4Grouped(32) != Int4Grouped(128)
    assert quant.parse(Int4Grouped(32)) is not None and quant.parse(Int4Grouped(32)).group_size == 32
    assert {Int4Grouped(32), Int4Grouped(32), Int8PerRow()} == {Int4Grouped(32), Int8PerRow()}  # values, hashable
    for scheme in (Int8PerRow(), Int4Grouped(32), Int4Grouped(128)):
        assert quant.from_entry(json.loads(json.dumps(scheme.entry())), "params.json") == scheme


@pytest.mark.parametrize("call,match", [
    (lambda: quant.parse("int3"), r"quantize must be one of \['int8', 'int4'\] or None, got 'int3'"),
    (lambda: quant.parse(8), r"got 8"),
    (lambda: quant.parse("int4", 48), r"group_size must be one of \[32, 64, 128\] for int4, got 48"),
    (lambda: Int4Grouped(100), r"got 100"),
    (lambda: quant.parse("int8", 64), r"group_size applies to int4 only"),
    (lambda: quant.parse(Int4Grouped(32), 64), r"group_size=64 contradicts the scheme int4 \(groups of 32\)"),
    (lambda: quant.from_entry({"mode": "int4", "group": 64}, "params.json"), r"params\.json: \"quantization\""),
    (lambda: quant.from_entry({"mode": "int5"}, "params.json"), r"params\.json: quantize must be one of"),
])
def test_bad_names_are_value_errors_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- the exact codes ---------------------------------------------------------------------------------------


def test_int8_codes_and_scales_equal_the_definition():
    w = _weight()
    q = Int8PerRow().quantize(w)
    codes, scales = reference_int8(w)
    assert q.scheme == Int8PerRow() and q.zeros is None
    assert torch.equal(q.qweight, codes) and torch.equal(q.scales, scales)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_codes_scales_and_zeros_equal_the_definition(group):
    w = _weight()
    q = Int4Grouped(group).quantize(w)
    packed, scales, zeros = reference_int4(w, group)
    assert q.scheme == Int4Grouped(group) and q.group_size == group and q.in_features == 256
    assert torch.equal(q.qweight, packed) and torch.equal(q.scales, scales) and torch.equal(q.zeros, zeros)


# --- checkpoints as written before the schemes -------------------------------------------------------------


def _linear_keys(state):
    return sorted(k[: -len(".weight")] for k, v in state.items()
                  if v.dim() == 2 and k != "tok_embeddings.weight")


def _write_old_format(folder, state, entry):
    """A one-shard quantized checkpoint with the keys and params.json of `python -m llama quantize` before the
    schemes (int8: <layer>.weight int8 + .scales (N,); int4: .weight uint8 (N, K/2) + .scales + .zeros
    (N, K/G), all bfloat16 floats; "quantization": {"mode", ["group_size"]}), written with torch.save here."""
    folder.mkdir()
    out = dict(state)
    for layer in _linear_keys(state):
        w = out.pop(f"{layer}.weight")
        if entry["mode"] == "int8":
            out[f"{layer}.weight"], out[f"{layer}.scales"] = reference_int8(w)
        else:
            out[f"{layer}.weight"], out[f"{layer}.scales"], out[f"{layer}.zeros"] = reference_int4(
                w, entry["group_size"])
    torch.save(out, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps({**GQA.to_params(vocab_size=-1), "quantization": entry}))
    return folder


def _logits(ckpt, **kwargs):
    gen = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=32, max_batch_size=1, device="cpu", **kwargs)
    with torch.inference_mode():
        return gen.model.prefill([gen.tokenizer.encode("The capital of France is", bos=True, eos=False)])[0]


@pytest.mark.parametrize("entry", [{"mode": "int8"}, {"mode": "int4", "group_size": 32}])
def test_a_checkpoint_in_the_old_format_loads_and_equals_quantizing_at_load(tmp_path, entry):
    state = random_state(GQA, seed=4)
    bf16 = make_checkpoint(tmp_path / "bf16", GQA, 1, state=state)
    old = _write_old_format(tmp_path / "old", state, entry)
    stored = _logits(old)
    at_load = _logits(bf16, quantize=entry["mode"], group_size=entry.get("group_size"))
    assert torch.equal(stored, at_load)
    # and the current writer writes exactly those files' tensors
    new = quantize.quantize_checkpoint(bf16, tmp_path / "new", entry["mode"], entry.get("group_size"))
    a, b = (torch.load(d / "consolidated.00.pth", weights_only=True) for d in (old, new))
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((new / "params.json").read_text())["quantization"] == entry


# --- a new scheme is one class --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Int8Again(Int8PerRow):
    """A scheme added by a user: int8 under another name (nothing else in the library knows it)."""

    name: ClassVar[str] = "int8-again"


def test_a_new_scheme_is_one_class_and_a_registry_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(quant.SCHEMES, _Int8Again.name, _Int8Again)
    bf16 = make_checkpoint(tmp_path / "bf16", GQA, 1, seed=6)
    assert torch.equal(_logits(bf16, quantize="int8-again"), _logits(bf16, quantize="int8"))
    out = quantize.quantize_checkpoint(bf16, tmp_path / "q", "int8-again")
    assert json.loads((out / "params.json").read_text())["quantization"] == {"mode": "int8-again"}
    assert torch.equal(_logits(out), _logits(bf16, quantize="int8"))


# --- slicing for a process ---------------------------------------------------------------------------------


def test_each_scheme_slices_its_entries_like_the_layer_except_whole_row_vectors():
    from llama.checkpoints.checkpoint import split_dim

    for scheme in (Int8PerRow(), Int4Grouped(32), None):
        assert split_dim("layers.0.attention.wq.weight", 2, scheme) == 0
        assert split_dim("layers.0.feed_forward.w2.weight", 2, scheme) == 1
        assert split_dim("layers.0.attention.wq.scales", 1, scheme) == 0  # per output row: rows split
        assert split_dim("layers.0.feed_forward.w2.scales", 1, scheme) is None  # whole rows on every shard
        assert split_dim("layers.0.feed_forward.w2.scales", 2, scheme) == 1  # groups split with the inputs
        assert split_dim("layers.0.feed_forward.w2.zeros", 2, scheme) == 1
        assert split_dim("layers.0.attention_norm.weight", 1, scheme) is None
