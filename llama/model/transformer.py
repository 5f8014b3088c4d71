"""The Llama 2 Transformer, model-parallel over the layers in layers.py.

Read top to bottom (the hyper-parameters, ModelArgs and ArchSpec, are in args.py): RMSNorm, rotary embeddings,
where a call's tokens sit (Rows, Packed), the KV cache, Attention, FeedForward, TransformerBlock, Transformer.
Nothing here touches files or picks a device: the model is built on whatever device is current
(``torch.device("meta")`` while loading) and receives its weights from loading.py. The architecture options
(ArchSpec: biases) are read generically from the args; this module changes only when the math does.
"""

from __future__ import annotations

import itertools
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .args import (  # noqa: F401  (the names this module always had)
    PRESETS, ArchSpec, ModelArgs, RopeScaling, check_positive_int, count_parameters, memory_per_process)
from .kv_cache import BLOCK_SIZE, BlockTables, GatherScratch, KVPool, Packed, Rows, blocks_for
from .kv_int8 import KVPoolInt8, check_kv_dtype
from .paged_attention import attend_token
from .layers import ColumnParallelLinear, ParallelEmbedding, ParallelLinear, RowParallelLinear, fuse_columns, \
    fused_sizes, model_parallel_world


# --- the pieces --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the model's dtype, as the released model was."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_pos: int, theta: float, scaling: Optional[RopeScaling] = None) -> torch.Tensor:
    """cos and sin of every position's rotation angles, shape (max_pos, head_dim // 2, 2), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of each head, as Meta's checkpoints expect.

    x: (B, S, H, D); table: (B, S, D/2, 2) holding cos and sin for each token's own position. Eager code
    multiplies the pairs as complex numbers (one kernel, 4-10x faster at prefill than the real form, same bits);
    torch.compile gets the real form, which it fuses (it generates no code for complex numbers).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if not torch.compiler.is_compiling():
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(table).unsqueeze(2))
        return rotated.flatten(-2).type_as(x)
    cos, sin = table[..., 0].unsqueeze(2), table[..., 1].unsqueeze(2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


# --- the blocks --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Grouped-query self-attention; each rank holds n_heads/M query heads and n_kv_heads/M KV heads."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        world = model_parallel_world()
        self.n_local_heads = args.n_heads // world
        self.n_local_kv_heads = args.kv_heads // world
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        bias = args.arch.attention_bias
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, bias=bias)
        self.wk = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, bias=bias)
        self.wv = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, bias=bias)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=bias)
        self.wqkv: Optional[ColumnParallelLinear] = None  # wq, wk, wv in one product, after `fuse`
        self.qkv_sizes: List[int] = []
        self.cache: Optional[KVPool] = None  # attached by Transformer.setup_cache

    def fuse(self) -> None:
        self.qkv_sizes = fused_sizes([self.wq, self.wk, self.wv])
        self.wqkv = fuse_columns([self.wq, self.wk, self.wv])
        del self.wq, self.wk, self.wv

    def forward(self, x: torch.Tensor, rope: torch.Tensor, where: Union[Rows, Packed, None]) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = apply_rope(q.view(bsz, seqlen, self.n_local_heads, self.head_dim), rope)
        k = apply_rope(k.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim), rope)
        v = v.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        if where is None:  # no cache (training): the call's own tokens, causally
            out = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        else:
            stored = self.cache.write(where.slots, k, v, stored=isinstance(where, Packed))
            if stored is not None:  # int8 KV: attend over what the pool keeps, as every later step will
                k, v = stored
            out = self._within_segments(q, k, v, where.segments) if isinstance(where, Packed) else \
                self._over_cache(q, where)
        return self.wo(out.reshape(bsz, seqlen, -1))

    def _attend(self, q, keys, values, mask=None, causal=False):
        """q (B, H, S, D) over keys/values (B, KV, T, D), for prefill-sized calls where copying K/V is cheap."""
        if self.n_rep > 1:
            keys, values = keys.repeat_interleave(self.n_rep, 1), values.repeat_interleave(self.n_rep, 1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal).transpose(1, 2)

    def _within_segments(self, q, k, v, segments):
        """Causal attention within each prompt of a packed (1, N) prefill."""
        outs = [self._attend(q[:, a:b].transpose(1, 2), k[:, a:b].transpose(1, 2), v[:, a:b].transpose(1, 2),
                             causal=True) for a, b in segments]
        return torch.cat(outs, dim=1)

    def _over_cache(self, q, where: Rows):
        """Each row's tokens over that row's cached keys, gathered from the pool through its block table
        (`where.blocks`) and masked to the positions up to each token's own (`where.mask`, (B, S, T))."""
        bsz, seqlen = q.shape[:2]
        if where.alone is not None and seqlen == 1:  # each row by itself: its arithmetic never sees the others'
            rows = [Rows(where.slots[b:b + 1], where.blocks[b:b + 1, :blocks_for(n)], n, where.mask[b:b + 1, :, :n])
                    for b, n in enumerate(where.alone)]
            return torch.cat([self._over_cache(q[b:b + 1], row) for b, row in enumerate(rows)])
        if seqlen > 1:  # (SDPA's own grouped-query form: the same numbers as repeating K/V n_rep times, uncopied)
            keys, values = self.cache.read(where.blocks, where.window, reuse=True)
            return F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=where.mask.unsqueeze(1),
                                                  enable_gqa=self.n_rep > 1).transpose(1, 2)
        # One token per row: query head h reads KV head h // n_rep, so grouping a KV head's n_rep query heads
        # along the sequence axis serves them in one call without copying K/V n_rep times.
        q = q.view(bsz, self.n_local_kv_heads, self.n_rep, self.head_dim)
        out = attend_token(q, self.cache, where)
        return out.reshape(bsz, 1, self.n_local_heads, self.head_dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=bias)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=bias)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=bias)
        self.w13: Optional[ColumnParallelLinear] = None  # w1 and w3 in one product, after `fuse`
        self.w13_sizes: List[int] = []

    def fuse(self) -> None:
        self.w13_sizes = fused_sizes([self.w1, self.w3])
        self.w13 = fuse_columns([self.w1, self.w3])
        del self.w1, self.w3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.w13_sizes, dim=-1) if self.w13 is not None else (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, args.arch.mlp_bias)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, where: Union[Rows, Packed, None]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, where)
        return h + self.feed_forward(self.ffn_norm(h))


# --- the model ---------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """Token ids in, float32 logits out; keeps its own KV cache between calls."""

    def __init__(self, params: ModelArgs) -> None:
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError("Transformer needs a concrete vocab_size (resolve -1 from the tokenizer first)")
        self.params = params
        self.vocab_size, self.n_layers = params.vocab_size, params.n_layers
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, gather_output=True)
        self.lora_set = None  # the banks of per-request LoRA adapters (lora_bank.attach), if any
        self.kv_dtype: Optional[str] = None  # the KV pool's storage when not the model's dtype ("int8"; setup_cache)

    # --- after the weights are in --------------------------------------------------------------------------

    def setup_rope(self, device: Union[str, torch.device]) -> None:
        p = self.params
        self.register_buffer("rope", rope_tables(p.head_dim, p.max_seq_len, p.rope_theta,
                                                     p.rope_scaling).to(device), persistent=False)

    def setup_cache(self, device: Union[str, torch.device], dtype: torch.dtype,
                    blocks: Optional[int] = None, kv_dtype: Optional[str] = None) -> None:
        """Allocate the rotary tables, the block tables and every layer's pool of KV blocks (llama/model/kv_cache.py)
        on the model's device. blocks: the pool's size, the null block included, with every table empty (an
        engine assigns blocks); None: a row cache, each of the max_batch_size rows mapped to its own blocks.
        kv_dtype: None (or "auto") keeps keys and values in `dtype`; "int8" stores them in 8 bits (kv_int8.py)."""
        kv_dtype = check_kv_dtype(kv_dtype)
        pool_class = KVPool if kv_dtype is None else KVPoolInt8
        self.kv_dtype = kv_dtype
        p = self.params
        self.setup_rope(device)
        self.tables = BlockTables(p.max_batch_size, p.max_seq_len, BLOCK_SIZE, device)
        if blocks is None:
            blocks = self.tables.map_rows()
        if not isinstance(blocks, int) or blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is the null block), got {blocks!r}")
        self.pool_blocks = blocks
        scratch = GatherScratch()
        for layer in self.layers:
            attn = layer.attention
            cache = pool_class(blocks, BLOCK_SIZE, attn.n_local_kv_heads, p.head_dim, dtype, scratch)
            attn.cache = cache.to(device)

    def prepare(self, kernel: Optional[Callable[[Union[torch.Tensor, nn.Module]], Optional[nn.Module]]] = None
                ) -> None:
        """Make inference faster: fuse wq/wk/wv and w1/w3 into single products and, where `kernel(weight)`
        returns a module, compute each linear layer through it (packed or quantized weights). `kernel` gets a
        layer's weight, or for a layer loaded without one (a quantized checkpoint's) the module it computes
        through. Each original weight is released as it is replaced, so memory stays near one copy of the
        model. Afterwards the state dict is no longer in Meta's layout: build with fast=False to read or edit
        the weights through the model."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        if kernel is not None:
            for module in self.modules():
                if isinstance(module, ParallelLinear):
                    prepared = kernel(module.weight.data if module.weight is not None else module.kernel)
                    if prepared is not None:
                        module.use_kernel(prepared)

    def assign_blocks(self, row: int, first: int, blocks: Sequence[int]) -> None:
        """Row `row`'s block table from entry `first` on: `blocks`, then the null block."""
        self.tables.assign(row, first, blocks)

    def copy_blocks(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy pool blocks src[i] into dst[i] in every layer (a shared, partly filled block copied on write)."""
        device = self.rope.device
        s, d = torch.tensor(list(src), device=device), torch.tensor(list(dst), device=device)
        for layer in self.layers:
            layer.attention.cache.copy_block(s, d)

    @property
    def has_cache(self) -> bool:
        return self.layers[0].attention.cache is not None

    # --- the three ways in ---------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor] = 0,
        logits_at: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run `tokens` (B, S) placed at positions start_pos.. of each row and return logits.

        start_pos: one int for the whole batch (as in the released reference) or a (B,) tensor, one per row, so
        each row of a batch can decode at its own position. Each row attends to its own cached positions up to
        its own, never beyond.
        logits_at: optional (B, K) indices into the S input positions; only there are logits computed (the
        output projection over the vocabulary is the costliest matrix at a single position). Default: all.
        Without `setup_cache` (training), or when an engine manages the paged pool (a model built by Llama.build),
        only start_pos 0 is possible and the call attends causally to itself, writing no keys.
        """
        bsz, seqlen = tokens.shape
        if bsz > self.params.max_batch_size:
            raise ValueError(f"batch of {bsz} exceeds max_batch_size {self.params.max_batch_size}")
        start = torch.as_tensor(start_pos, device=tokens.device).reshape(-1).expand(bsz)
        positions = start.unsqueeze(1) + torch.arange(seqlen, device=tokens.device)  # (B, S)
        length = int(positions.max()) + 1
        if int(positions.min()) < 0 or length > self.params.max_seq_len:
            raise ValueError(f"positions up to {length - 1} do not fit max_seq_len {self.params.max_seq_len}")
        if not self.has_cache or not self.tables.static:
            if int(start.max()) != 0:
                raise ValueError("without a KV cache (setup_cache not called) only start_pos 0 is possible; with a "
                                 "paged pool that an engine manages (Llama's), forward starts at 0 and keeps no "
                                 "keys: continue through the engine")
            return self._run(tokens, positions, None, logits_at)
        return self._run(tokens, positions, Rows.at(self.tables, positions, length), logits_at)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, window: int,
               alone: Optional[Sequence[int]] = None) -> torch.Tensor:
        """One new token per cache row 0..B-1: tokens (B,) at positions (B,) (-1: an idle row, written into the
        null block), every position below `window`.
        Returns the next-token logits (B, V). The shapes depend only on B and the host int `window`, and
        nothing here reads a device value, so a compiled or graph-captured step replays without host syncs.
        alone: each row's position + 1 (host ints): every row attends by itself over its own positions, so that
        its arithmetic depends on its own length only (deterministic mode, eager), at the cost of what it holds."""
        positions = positions.unsqueeze(1)
        where = Rows.at(self.tables, positions, window)
        where.alone = None if alone is None else list(alone)
        return self._run(tokens.unsqueeze(1), positions, where, None)[:, 0]

    def decode_many(self, tokens: torch.Tensor, positions: torch.Tensor, window: int,
                    logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Several new tokens per cache row 0..B-1 (speculative verification, a draft model's catch-up): tokens
        (B, S) at positions (B, S), each seeing its row's cached positions up to its own below `window`. Returns
        logits (B, S, V), or (B, K, V) at logits_at (B, K) indices into S. A row with fewer real tokens repeats its
        last (token, position), which writes the same keys and values again."""
        return self._run(tokens, positions, Rows.at(self.tables, positions, window), logits_at)

    def prefill(self, prompts: Sequence[Sequence[int]], rows: Optional[Sequence[int]] = None,
                all_logits: bool = False) -> torch.Tensor:
        """Fill cache rows (default 0..B-1) with the given prompts in one packed forward pass: no padding is
        computed, however ragged the prompts. Returns the logits (B, V) of each prompt's last token, or with
        all_logits those of every token, (N, V) for the N tokens of all prompts in order."""
        device = self.rope.device
        lengths = [len(p) for p in prompts]
        rows = list(range(len(prompts))) if rows is None else list(rows)
        if len(rows) != len(prompts) or not all(0 <= r < self.params.max_batch_size for r in rows) or \
                max(lengths) > self.params.max_seq_len:
            raise ValueError(f"{len(prompts)} prompts of up to {max(lengths)} tokens in rows {rows} do not fit "
                             f"the cache ({self.params.max_batch_size} x {self.params.max_seq_len})")
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device).unsqueeze(0)
        row_of = torch.repeat_interleave(torch.tensor(rows, device=device), torch.tensor(lengths, device=device))
        positions = torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)
        ends = list(itertools.accumulate(lengths))
        where = Packed(self.tables.slots(row_of.unsqueeze(0), positions),
                       [(end - n, end) for end, n in zip(ends, lengths)])
        logits_at = None if all_logits else torch.tensor(ends, device=device).unsqueeze(0) - 1
        return self._run(tokens, positions, where, logits_at)[0]

    def extend(self, tokens: Sequence[int], row: int, start: int, all_logits: bool = False) -> torch.Tensor:
        """Continue cache row `row` with tokens at positions start..start+n-1, attending over the row's cached
        positions below start (a chunk of a long prompt, after the chunks before it). Returns the logits of the
        last token (1, V), or with all_logits those of every token (n, V)."""
        device = self.rope.device
        n = len(tokens)
        if not 0 <= row < self.params.max_batch_size or start < 0 or start + n > self.params.max_seq_len or not n:
            raise ValueError(f"{n} tokens at positions {start}.. of row {row} do not fit the cache "
                             f"({self.params.max_batch_size} x {self.params.max_seq_len})")
        positions = (start + torch.arange(n, device=device)).unsqueeze(0)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        logits_at = None if all_logits else torch.tensor([[n - 1]], device=device)
        return self._run(ids, positions, Rows.at(self.tables, positions, start + n, first=row), logits_at)[0]

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, where: Union[Rows, Packed, None],
             logits_at: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        rope = self.rope[positions.clamp(min=0)]
        for layer in self.layers:
            h = layer(h, rope, where)
        if logits_at is not None:
            h = h.gather(1, logits_at.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return self.output(self.norm(h)).float()


__all__ = ["ModelArgs", "Transformer", "RMSNorm", "Attention", "FeedForward", "TransformerBlock", "KVPool",
           "count_parameters"]
