"""The opened checkpoint (llama/checkpoints/source.py) and the one table of parameter shapes (checkpoint.model_layout)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import GQA, TOKENIZER, make_checkpoint
from llama import quantize
from llama.checkpoints.checkpoint import model_layout
from llama.model import ModelArgs, Transformer
from llama.quant import Int4Grouped
from llama.checkpoints.source import Checkpoint


def test_layout_shapes_and_split_dims_follow_the_model_arithmetic():
    layout = model_layout(GQA)
    head, kv, ffn = GQA.head_dim, GQA.kv_heads * GQA.head_dim, GQA.ffn_hidden_dim
    assert layout.shapes["layers.1.attention.wk.weight"] == (kv, GQA.dim)
    assert layout.shapes["layers.0.feed_forward.w2.weight"] == (GQA.dim, ffn)
    assert layout.shapes["rope.freqs"] == (head // 2,)
    assert layout.split_dims["tok_embeddings.weight"] == 1 and layout.split_dims["output.weight"] == 0
    assert layout.split_dims["layers.0.attention.wo.weight"] == 1 and layout.split_dims["norm.weight"] is None
    assert len(layout.linear) == 7 * GQA.n_layers + 1 and "layers.0.attention.wq" in layout.linear
    two = layout.fused_shapes(2)
    assert two["layers.0.attention.wqkv"] == ((GQA.dim + 2 * kv) // 2, GQA.dim)
    assert two["layers.0.feed_forward.w13"] == (ffn, GQA.dim) and two["layers.0.feed_forward.w2"] == (GQA.dim, ffn // 2)
    # the run's sizes change no shape: one layout for both
    assert model_layout(ModelArgs(**{**GQA.to_params(), "max_seq_len": 7, "max_batch_size": 3})) is layout
    with torch.device("meta"):
        real = {k: tuple(v.shape) for k, v in Transformer(GQA).state_dict().items()}
    assert {k: v for k, v in layout.shapes.items() if k != "rope.freqs"} == real


def test_an_opened_checkpoint_knows_its_layout_shards_params_and_scheme(tmp_path):
    meta = make_checkpoint(tmp_path / "meta", GQA, 2, seed=1)
    ckpt = Checkpoint.open(meta)
    assert (ckpt.layout, ckpt.n_shards, ckpt.scheme, ckpt.quantization) == ("meta", 2, None, None)
    assert ckpt.params["vocab_size"] == -1 and ckpt.args.vocab_size == GQA.vocab_size  # from the weights
    ckpt.args.dim = 1  # a copy: the checkpoint's own stays
    assert ckpt.args.dim == GQA.dim
    run = ckpt.run_args(max_seq_len=64, max_batch_size=3)
    assert (run.max_seq_len, run.max_batch_size, run.dim) == (64, 3, GQA.dim)
    with pytest.raises(ValueError, match=r"valid process counts: \[1, 2\]"):
        ckpt.check_world(4)
    q = quantize.quantize_checkpoint(meta, tmp_path / "q", "int4", 32)
    opened = Checkpoint.open(q)
    assert opened.scheme == Int4Grouped(32) and opened.quantization == {"mode": "int4", "group_size": 32}
    state = opened.load_rank_state(1, 2)
    assert state["layers.0.feed_forward.w2.zeros"].shape == (GQA.dim, GQA.ffn_hidden_dim // 2 // 32)


def test_a_hugging_face_folder_opens_as_such(tmp_path):
    pytest.importorskip("safetensors")
    from llama.checkpoints.convert import meta_to_hf

    hf_dir = meta_to_hf(make_checkpoint(tmp_path / "meta", GQA, 1, seed=2), tmp_path / "hf", tokenizer_path=TOKENIZER)
    ckpt = Checkpoint.open(hf_dir)
    assert ckpt.layout == "hf" and ckpt.scheme is None and ckpt.args.vocab_size == GQA.vocab_size
    assert json.loads((hf_dir / "config.json").read_text())["hidden_size"] == ckpt.args.dim
