"""The KV cache in 8 bits (kv_dtype="int8", llama/model/kv_int8.py): the scheme against an independent NumPy
implementation, log-probs against transformers' float32 model, preemption and prefix hits under int8 KV, the
fused C step against the PyTorch path, the memory it saves, and bad values named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TOKENIZER, assert_same_cached_keys, decode_against_float32, make_checkpoint, scatter_blocks
from llama import Llama
from llama.checkpoint import random_state
from llama.model import ModelArgs, Transformer
from llama.model.kv_cache import BLOCK_SIZE, layer_block_bytes, pool_bytes_per_block
from llama.model.kv_int8 import KVPoolInt8, check_kv_dtype, quantize

from test_engine import SHAPE, prompts
from test_paged import build as build_paged, check_preempted_answers, ckpt  # noqa: F401  (ckpt: a fixture)

PER_BLOCK_INT8 = pool_bytes_per_block(SHAPE.n_layers, SHAPE.kv_heads, SHAPE.head_dim, torch.float32,
                                      kv_dtype="int8")


# --- the scheme, against NumPy ------------------------------------------------------------------------------


def _bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32: the top 16 bits, rounded."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def _numpy_quantize(x: np.ndarray):
    """The scheme as docs/serving.md states it: s = bf16(max|x| / 127) per vector, q = round-half-even(x / s)."""
    x = x.astype(np.float32)
    scale = _bf16_round(np.abs(x).max(-1) / np.float32(127))
    safe = np.where(scale == 0, np.float32(1), scale)
    codes = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return codes, scale


def test_quantize_and_the_pools_round_trip_equal_a_numpy_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 32, generator=g) * torch.logspace(-3, 2, 40).view(40, 1, 1)
    x[5, 1] = 0  # an all-zero vector: scale 0, codes 0
    x[6, 2, 7] = 1e4  # one outlier: its vector's other values round to few codes
    codes, scale = quantize(x)
    want_codes, want_scale = _numpy_quantize(x.numpy())
    assert np.array_equal(codes.numpy(), want_codes)
    assert np.array_equal(scale.float().numpy(), want_scale) and scale.dtype == torch.bfloat16
    # relative error of the round trip: at most half a step of max|x| / 127 per value
    back = codes.float() * scale.float().unsqueeze(-1)
    assert ((back - x).abs() <= 0.5 * scale.float().unsqueeze(-1) * 1.0001 + 1e-30).all()

    pool = KVPoolInt8(blocks=6, block_size=4, n_kv_heads=3, head_dim=32, dtype=torch.float32)
    slots = torch.tensor([[21, 5, 6, 7, 12, 13, 14, 15, 16, 17]])  # scattered over blocks 5, 1, 3, 4
    k, v = x[:10].unsqueeze(0), x[10:20].unsqueeze(0)
    stored_k, stored_v = pool.write(slots, k, v)
    kc, ks = _numpy_quantize(k.numpy()[0])
    vc, vs = _numpy_quantize(v.numpy()[0])
    np.testing.assert_array_equal(stored_k.numpy()[0], kc.astype(np.float32) * ks[..., None])
    np.testing.assert_array_equal(stored_v.numpy()[0], vc.astype(np.float32) * vs[..., None])
    keys, values = pool.read(torch.tensor([[1, 3, 4]]), 10)  # positions 0..9 of a row holding blocks 1, 3, 4
    for t, slot in enumerate([5, 6, 7, 12, 13, 14, 15, 16, 17]):  # the row's positions 1..9 are slots 5..17
        i = 1 + t
        np.testing.assert_array_equal(keys[0, :, 1 + t].numpy(), kc[i].astype(np.float32) * ks[i][:, None])
        np.testing.assert_array_equal(values[0, :, 1 + t].numpy(), vc[i].astype(np.float32) * vs[i][:, None])


def test_int8_blocks_take_about_half_the_bytes():
    for head_dim, ratio in ((64, (64 + 2) / 128), (128, (128 + 2) / 256)):
        bf16 = pool_bytes_per_block(32, 8, head_dim, torch.bfloat16)
        int8 = pool_bytes_per_block(32, 8, head_dim, torch.bfloat16, kv_dtype="int8")
        assert int8 / bf16 == ratio
    pool = KVPoolInt8(blocks=3, block_size=BLOCK_SIZE, n_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    assert 2 * layer_block_bytes(pool) == pool_bytes_per_block(2, 2, 64, torch.bfloat16, kv_dtype="int8")


# --- through the engine ---------------------------------------------------------------------------------------


def build(ckpt, blocks=None, **options) -> Llama:
    """test_paged's model (its checkpoint: the `ckpt` fixture) with an int8 pool of `blocks` blocks."""
    return build_paged(ckpt, blocks, per_block=PER_BLOCK_INT8, kv_dtype="int8", **options)


def test_the_same_gib_holds_about_twice_the_tokens_and_the_start_line_says_int8(ckpt, capsys):
    gib = 40 * PER_BLOCK_INT8 / 2 ** 30
    int8 = build(ckpt, blocks=39)
    out = capsys.readouterr().out
    assert "KV cache: 39 blocks of 16 positions (624 tokens, int8 with a bfloat16 scale" in out
    plain = Llama.build(str(ckpt), str(TOKENIZER), max_seq_len=128, max_batch_size=6, device="cpu",
                        dtype="float32", kv_cache_gib=gib)
    assert isinstance(int8.model.layers[0].attention.cache, KVPoolInt8) and int8.model.kv_dtype == "int8"
    # float32 values (4 bytes) against int8 codes and a 2-byte scale per 16 values: 64 / 18 = 3.6x
    assert int8.model.pool_blocks == 40 and plain.model.pool_blocks == 40 * (16 + 2) // 64


@pytest.mark.parametrize("prefix_cache", [False, True], ids=["plain", "prefix-cache"])
def test_preempted_int8_requests_continue_with_the_tokens_they_would_have_had_alone(ckpt, prefix_cache):
    check_preempted_answers(build(ckpt, blocks=14, prefix_cache=prefix_cache), build(ckpt, prefix_cache=False))


# The bound on |log p(int8 KV) - log p(transformers, float32)| per token, on this random model (measured: max
# 0.009, mean 0.002 nats; the exact pool's difference is below 1e-5, tests/test_paged.py).
LOGPROB_BOUND = 0.03


def test_int8_log_probs_are_within_the_bound_of_transformers_float32(tmp_path):
    pytest.importorskip("transformers")
    from test_parity import meta_to_hf

    state = random_state(SHAPE, seed=29)
    gen = build(make_checkpoint(tmp_path, SHAPE, state=state), blocks=40)
    hf = meta_to_hf(state, SHAPE)
    ps = prompts(4, seed=12)
    gen.generate(prompts(5, seed=13), max_gen_len=9, temperature=0)  # scattered tables
    out, lps = gen.generate(ps, max_gen_len=20, temperature=0, logprobs=True)
    deltas = []
    for p, toks, lp in zip(ps, out, lps):
        with torch.no_grad():
            logits = hf(torch.tensor([p + toks])).logits[0, len(p) - 1:-1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(toks).unsqueeze(-1)).squeeze(-1)
        deltas.append((torch.tensor(lp) - expected).abs())
    deltas = torch.cat(deltas)
    assert deltas.max() <= LOGPROB_BOUND, deltas.max()
    assert deltas.max() > 1e-5  # the keys and values really went through 8 bits


# The demo model's held-out loss (heldout.txt, as tests/test_demo.py scores it) with int8 KV over bfloat16 KV, in
# nats per token (measured +0.0002: 4.4578 against 4.4576, benchmarks/bench_kv_int8.py --part loss).
DEMO_LOSS_BOUND = 0.01


def test_the_demos_held_out_loss_barely_moves_with_int8_kv():
    import torch.nn.functional as F
    from test_demo import DEMO, _fortunes

    losses = {}
    for kv in ("auto", "int8"):
        gen = Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), max_seq_len=256, max_batch_size=1,
                          device="cpu", kv_dtype=kv)
        gen.model.setup_cache("cpu", gen.model.norm.weight.dtype, kv_dtype=kv)  # a row of its own: forward
        total, count = 0.0, 0  # reads the keys back from the pool
        with torch.inference_mode():
            for doc in _fortunes(DEMO / "heldout.txt"):
                ids = torch.tensor([gen.tokenizer.encode(doc, bos=True, eos=True)[:256]])
                total += F.cross_entropy(gen.model(ids[:, :-1])[0], ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
        losses[kv] = total / count
    assert losses["auto"] != losses["int8"]  # the int8 pool was read
    assert abs(losses["int8"] - losses["auto"]) <= DEMO_LOSS_BOUND, losses


# --- the fused C step -------------------------------------------------------------------------------------------


def test_the_fused_step_reads_and_writes_int8_kv_as_the_pytorch_path_does():
    from test_fused_decode import _build, _reference
    from llama.model.decode_step import DecodeStep

    fused_model, plain_model, exact = _build("int8"), _build("int8"), _reference("int8")
    prompts_ = [list(range(3, 40)), [7, 7, 1], list(range(50, 70))]
    for model in (fused_model, plain_model):  # an int8 pool, each row's blocks scattered in reverse order
        scatter_blocks(model, [len(p) + 8 for p in prompts_], kv_dtype="int8")
    fused, plain = DecodeStep(fused_model, compiled=False), DecodeStep(plain_model, compiled=False, fused=False)
    assert fused.fused is not None and plain.fused is None
    errors, _, positions = decode_against_float32(fused, plain, exact, prompts_, 8)
    assert 0 < errors["fused"] <= 1.25 * errors["plain"], errors
    assert_same_cached_keys(fused_model, plain_model, positions)  # the C code stored the keys the PyTorch path did


def test_int8_rows_longer_than_a_piece_are_attended_in_pieces_on_every_instruction_set():
    """decode.c's int8 attention takes the bf16 pool's shape: 1024-position pieces over the threads, merged in
    order. A 2,500-position row is as close to float32 as the PyTorch path reading the same int8 pool, its logits
    do not depend on the other row, and every instruction set computes the same step."""
    from test_fused_decode import _build, _reference
    from llama.model.decode_step import DecodeStep
    from llama.model.fused_decode import FusedDecode

    fused_model, plain_model, exact = _build("int8", 2, 2600), _build("int8", 2, 2600), _reference("int8", 2, 2600)
    for model in (fused_model, plain_model):
        model.setup_cache(torch.device("cpu"), torch.bfloat16, kv_dtype="int8")
    fused, plain = DecodeStep(fused_model, compiled=False), DecodeStep(plain_model, compiled=False, fused=False)
    assert fused.fused is not None and plain.fused is None
    g = torch.Generator().manual_seed(5)
    prompts_ = [torch.randint(0, 96, (2500,), generator=g).tolist(), [7, 7, 1]]
    errors, tokens, positions = decode_against_float32(fused, plain, exact, prompts_, 3)
    with torch.inference_mode():
        alone = fused(tokens[:1], positions[:1])
        both = fused(tokens, positions)
        step, outs = FusedDecode(fused_model), {}
        best = step.isa
        for isa in range(best + 1):  # the same step again (its keys rewritten with the same values) on each ISA
            step.isa = isa
            outs[isa] = step(tokens[:1], positions[:1])
    assert 0 < errors["fused"] <= 1.25 * errors["plain"], errors
    assert torch.equal(alone[0], both[0])
    for out in outs.values():
        torch.testing.assert_close(out, outs[best], atol=2e-2, rtol=2e-2)

# --- errors and flags -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["fp8", "INT8", "bfloat16", 8, torch.int8])
def test_a_bad_kv_dtype_is_named_before_loading(tmp_path, bad):
    with pytest.raises(ValueError, match=f"kv_dtype must be 'auto'.*got {bad!r}".replace("(", r"\(")
                       .replace(")", r"\)")):
        Llama.build(str(tmp_path / "missing"), str(TOKENIZER), max_seq_len=64, max_batch_size=1, kv_dtype=bad)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=2, vocab_size=32, max_seq_len=32, max_batch_size=1))
    with pytest.raises(ValueError, match="kv_dtype must be"):
        model.setup_cache("cpu", torch.float32, kv_dtype=bad)
    assert check_kv_dtype("auto") is None and check_kv_dtype(None) is None and check_kv_dtype("int8") == "int8"


def test_the_server_and_chat_take_kv_dtype(monkeypatch):
    from llama.programs import chat
    from llama.programs import serve

    assert serve.parse_args(["--kv_dtype", "int8"]).kv_dtype == "int8"
    assert serve.parse_args([]).kv_dtype == "auto"
    assert chat.parser().parse_args(["--kv_dtype", "int8"]).kv_dtype == "int8"
    with pytest.raises(SystemExit):
        serve.parse_args(["--kv_dtype", "fp8"])
    seen = {}

    def fake_build(**kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(serve.Llama, "build", staticmethod(fake_build))
    assert serve.main(["--kv_dtype", "int8", "--port", "0"]) == 2
    assert seen["kv_dtype"] == "int8"
