"""Meta-layout weights as transformers' LlamaForCausalLM, converted independently of llama/checkpoints/hf.py.

The tests (tests/test_parity.py) and the benchmarks (bench_decode.py --hf, bench_core.py) compare this library
with transformers on the same weights; converting them here, apart from the library's own conversion, keeps a
mistake in llama/checkpoints/hf.py from hiding in both sides of the comparison. Hugging Face orders each head's rotary
pairs as two halves, not interleaved, so wq and wk rows are permuted as Hugging Face's own conversion script
does. Needs transformers; nothing else (no pytest, no path set-up).
"""

from __future__ import annotations

from typing import Dict

import torch

from llama import ModelArgs


def meta_to_hf(state: Dict[str, torch.Tensor], args: ModelArgs) -> "transformers.LlamaForCausalLM":  # noqa: F821
    """A float32 LlamaForCausalLM (eval mode, on the CPU) holding `state`, a Meta-layout state dict."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=256,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
    )

    def unpair(w: torch.Tensor, heads: int) -> torch.Tensor:
        # Meta: rows of a head ordered (pair, 2); Hugging Face: (2, pair).
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        hf[h + "self_attn.q_proj.weight"] = unpair(state[m + "attention.wq.weight"], args.n_heads)
        hf[h + "self_attn.k_proj.weight"] = unpair(state[m + "attention.wk.weight"], args.kv_heads)
        hf[h + "self_attn.v_proj.weight"] = state[m + "attention.wv.weight"]
        hf[h + "self_attn.o_proj.weight"] = state[m + "attention.wo.weight"]
        hf[h + "mlp.gate_proj.weight"] = state[m + "feed_forward.w1.weight"]
        hf[h + "mlp.up_proj.weight"] = state[m + "feed_forward.w3.weight"]
        hf[h + "mlp.down_proj.weight"] = state[m + "feed_forward.w2.weight"]
        hf[h + "input_layernorm.weight"] = state[m + "attention_norm.weight"]
        hf[h + "post_attention_layernorm.weight"] = state[m + "ffn_norm.weight"]
    model = transformers.LlamaForCausalLM(config).float().eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=False)
    if unexpected or not all("rotary" in k for k in missing):
        raise ValueError(f"the converted state does not fit LlamaForCausalLM: missing {missing}, unexpected "
                         f"{unexpected}")
    return model
