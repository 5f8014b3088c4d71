"""Shared test helpers: random checkpoints in Meta's layout, the tokenizer fixture, small model shapes."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Dict, Optional, Sequence

import pytest
import torch

from llama import ModelArgs
from llama.checkpoints.checkpoint import random_state, split_state, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer.model"
VOCAB = 32000  # the fixture's vocabulary

# A multi-head shape and a grouped-query shape with ffn_dim_multiplier (as 70B has), both tiny.
MHA = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, multiple_of=32)
GQA = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=VOCAB, multiple_of=64,
                ffn_dim_multiplier=1.3, rope_theta=500000.0)
SHAPES = {"mha": MHA, "gqa": GQA}


def require_kernels() -> None:
    """Skip a kernel test where the C kernels cannot be built here (no compiler), saying why; with
    LLAMA_REQUIRE_KERNELS=1 (as .ci/run sets) fail it instead, so CI cannot go green without running them."""
    from llama.cpu import qkernels

    if qkernels.load() is None:
        why = f"the C kernels could not be built here: {qkernels.unavailable()}"
        if os.environ.get("LLAMA_REQUIRE_KERNELS", "") not in ("", "0"):
            pytest.fail(f"{why} (LLAMA_REQUIRE_KERNELS is set)", pytrace=False)
        pytest.skip(why)


def make_checkpoint(folder: Path, args: ModelArgs, n_shards: int = 1, seed: int = 0,
                    state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write a random bfloat16 checkpoint with n_shards shards; params.json says vocab_size -1, as Meta's do."""
    state = random_state(args, seed=seed) if state is None else state
    return write_checkpoint(folder, args.to_params(vocab_size=-1), split_state(state, n_shards))


def run_torchrun(script: Path, args: Sequence[str], nproc: int, timeout: int = 300,
                 extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Launch `torchrun --nproc_per_node nproc script args` on this machine and return the finished process.

    With no `extra` launcher flags, --standalone picks a free local port, so tests may run side by side. The
    launcher is a fork of a process that has imported torch (tests/forked.py); its workers are new interpreters."""
    from forked import run_python

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return run_python("-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *(extra or ["--standalone"]),
                      str(script), *args, cwd=ROOT, env=env, timeout=timeout)


def hf_llama_tokenizer(sp, **options):
    """transformers.LlamaTokenizer (Rust `tokenizers` BPE with byte fallback) over a SentencePiece model's
    vocabulary: an independent second opinion on tokenization. Skips the calling test where transformers can't
    be set up. Why it is built this way is explained in tests/test_tokenizer.py's `reference` fixture."""
    import pytest

    transformers = pytest.importorskip("transformers")
    normalizers = pytest.importorskip("tokenizers.normalizers")
    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no generate_merges")
    transformers.logging.set_verbosity_error()
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    scores = {piece: sp.get_score(i) for i, piece in enumerate(pieces)}
    try:
        tokenizer = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), legacy=True,
                                                add_prefix_space=True, **options)
    except TypeError as err:
        pytest.skip(f"transformers {transformers.__version__}: LlamaTokenizer(vocab=, merges=) unsupported: {err}")
    tokenizer._tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer._tokenizer.pre_tokenizer = None
    return tokenizer


# --- the other families' fixtures ----------------------------------------------------------------------------

LLAMA3_TOKENIZER = ROOT / "tests" / "fixtures" / "llama3-tokenizer.model"
LLAMA3_VOCAB = 128256
CODELLAMA_PIECES = {32007: "\u2581<PRE>", 32008: "\u2581<SUF>", 32009: "\u2581<MID>", 32010: "\u2581<EOT>",
                    32015: "<step>"}  # <step>: Code Llama 70B Instruct's turn separator (its model card's token ids)


def codellama_tokenizer(folder: Path) -> Path:
    """Code Llama's 32016-token vocabulary, built from the Llama 2 fixture: 16 pieces appended with
    SentencePiece's model proto, the four infilling pieces at their published ids, placeholders elsewhere (see
    tests/fixtures/README.md)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(TOKENIZER.read_bytes())
    for token in range(VOCAB, VOCAB + 16):
        piece = proto.pieces.add()
        piece.piece = CODELLAMA_PIECES.get(token, f"<codellama_placeholder_{token}>")
        piece.score = 0.0
        piece.type = model_pb2.ModelProto.SentencePiece.NORMAL
    path = Path(folder) / "codellama-tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    return path


def llama3_reference():
    """tiktoken's own Encoding over the Llama 3 fixture, read by tiktoken's loader, with the special tokens as
    Llama 3.1 names them (the same reference as tests/test_families.py's `reference3`)."""
    import json

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(LLAMA3_TOKENIZER))
    specials = json.loads((LLAMA3_TOKENIZER.parent / "llama3-special-tokens.json").read_text())
    renamed = {128004: "<|finetune_right_pad_id|>", 128005: "<|step_id|>", 128008: "<|eom_id|>",
               128010: "<|python_tag|>"}
    names = {i: renamed.get(i, n) for n, i in specials.items()}
    numbered = [i for i in sorted(names) if i not in renamed and names[i].startswith("<|reserved")]
    for k, i in enumerate(i for i in numbered if i > 128010):
        names[i] = f"<|reserved_special_token_{k + 2}|>"
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    return tiktoken.Encoding("llama3-reference", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={n: i for i, n in names.items()})


PROGRAM_ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_program(*argv: str, timeout: float = 120, stdin: Optional[str] = None) -> subprocess.CompletedProcess:
    """`python ARGV` in the checkout, its output captured: a fork of a process that has imported torch already
    (tests/forked.py), for the many tests that watch a program answer its flags."""
    from forked import run_python

    return run_python(*argv, cwd=ROOT, env=PROGRAM_ENV, stdin=stdin, timeout=timeout)


@functools.lru_cache(maxsize=None)
def program_help(*argv: str) -> subprocess.CompletedProcess:
    """`python ARGV --help`, run once per test process: several files read the same programs' help."""
    return run_program(*argv, "--help", timeout=300)


# --- decode steps against a float32 model (test_fused_decode.py, test_kv_int8.py) ------------------------------


def scatter_blocks(model, lengths: Sequence[int], kv_dtype: Optional[str] = None) -> None:
    """A pool with each row's blocks scattered in reverse order over it (as an engine's tables end up), sized for
    rows of `lengths` positions."""
    per_row = [-(-n // 16) for n in lengths]
    model.setup_cache(torch.device("cpu"), model.layers[0].attention_norm.weight.dtype, blocks=2 + sum(per_row) + 3,
                      kv_dtype=kv_dtype)
    free = list(range(2 + sum(per_row) + 2, 1, -1))  # blocks counted down, skipping 0 (null) and 1
    for row, n in enumerate(per_row):
        model.assign_blocks(row, 0, [free.pop(0) for _ in range(n)])


def decode_against_float32(fused, plain, exact, prompts: Sequence[Sequence[int]], steps: int):
    """Prefill `prompts` into the models of two decode steps (the fused C step and the layer-by-layer one) and a
    float32 model, then decode `steps` tokens (the float32 model's greedy choices) through all three. Asserts
    the two steps agree to bfloat16 rounding at every step; returns their summed relative errors against float32
    ({"fused": .., "plain": ..}), and the next tokens and positions."""
    errors = {"fused": 0.0, "plain": 0.0}
    with torch.inference_mode():
        for model in (fused.model, plain.model, exact):
            model.prefill(prompts)
        tokens, positions = torch.arange(1, len(prompts) + 1), [len(p) for p in prompts]
        for _ in range(steps):
            ref = exact.decode(tokens, torch.tensor(positions), max(positions) + 1)
            a, b = fused(tokens, positions), plain(tokens, positions)
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape == ref.shape
            assert (a - b).norm() <= 0.05 * b.norm()  # the two agree to bfloat16 rounding
            errors["fused"] += (a - ref).norm().item() / ref.norm().item()
            errors["plain"] += (b - ref).norm().item() / ref.norm().item()
            tokens, positions = ref.argmax(-1), [p + 1 for p in positions]
    return errors, tokens, positions


def assert_same_cached_keys(x_model, y_model, lengths: Sequence[int]) -> None:
    """Both models' pools hold the same keys and values (to bfloat16 rounding) for each row's first lengths[row]
    positions, read through x_model's tables."""
    with torch.inference_mode():
        for x, y in zip(x_model.layers, y_model.layers):
            for row, length in enumerate(lengths):
                blocks = x_model.tables.blocks(row, 1, length)
                for a, b in zip(x.attention.cache.read(blocks, length), y.attention.cache.read(blocks, length)):
                    assert (a.float() - b.float()).norm() <= 0.05 * b.float().norm()
