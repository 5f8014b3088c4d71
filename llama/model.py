"""The Llama 2 Transformer, model-parallel over fairscale's layers.

Read top to bottom: ModelArgs, RMSNorm, rotary embeddings, the KV cache, Attention, FeedForward,
TransformerBlock, Transformer. Nothing here touches files or picks a device: the model is built on whatever
device is current (``torch.device("meta")`` while loading) and receives its weights from ``checkpoint.py``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import layers as fs_layers
from fairscale.nn.model_parallel import mappings as fs_mappings
from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size
from torch import nn

from . import cpu


@dataclass
class ModelArgs:
    """Hyper-parameters, as in Meta's params.json (plus the two sizes the KV cache is allocated for)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: taken from the tokenizer
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> "ModelArgs":
        """Build from a params.json mapping; an unknown key is an error naming it (a typo must not pass)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"params.json has unknown key(s) {unknown}; known keys are {sorted(known)}")
        args = cls(**{**params, **overrides})
        args.validate()
        return args

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size by the released rule: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings")
        if not isinstance(self.kv_heads, int) or self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads {self.n_kv_heads!r} must be a positive divisor of n_heads {self.n_heads}")
        if not (isinstance(self.vocab_size, int) and (self.vocab_size == -1 or self.vocab_size > 0)):
            raise ValueError(f"vocab_size must be -1 or a positive integer, got {self.vocab_size!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.ffn_dim_multiplier is not None and not (
            isinstance(self.ffn_dim_multiplier, (int, float)) and self.ffn_dim_multiplier > 0
        ):
            raise ValueError(f"ffn_dim_multiplier must be a positive number, got {self.ffn_dim_multiplier!r}")


# Shapes of the released models (their params.json) and of the 1.1B shape used by the benchmarks, as data.
PRESETS = {
    "1.1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256, vocab_size=32000),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, vocab_size=32000),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, vocab_size=32000),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                vocab_size=32000),
}


# --- fairscale's parallel layers, built without initialising weights ---------------------------------------
# fairscale's constructors fill a full-size float32 "master weight" and scatter it, which costs a full copy of
# every matrix per rank and breaks on the meta device. These subclasses only allocate the local shard, on the
# current device, uninitialised (checkpoint.py fills it). Their forward is fairscale's, with its collectives,
# except that the matrix product can use packed weights and the collectives are skipped at one process.


class _PackableLinear:
    """The matrix product may go through a CPU kernel path (llama.cpu) that holds the weight in its own layout."""

    path: Optional[cpu.LinearPath] = None  # set by pack_for_cpu, with `prepared`
    prepared: Any = None
    world = 1  # model-parallel processes, set at construction

    @property
    def packed(self) -> bool:
        return self.path is not None

    def pack_for_cpu(self, path: cpu.LinearPath) -> None:
        self.path, self.prepared = path, path.prepare(self.weight.data)
        self.weight = nn.Parameter(self.weight.data.new_empty(0), requires_grad=False)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) if self.path is None else self.path.linear(x, self.prepared)


def pack_fused(layers: Sequence["ColumnParallelLinear"], path: cpu.LinearPath) -> Tuple[Any, List[int]]:
    """One prepared weight for several column-parallel layers that read the same input (wq/wk/wv, w1/w3): one
    larger product streams faster than several small ones. Their own weights are released."""
    sizes = [layer.weight.shape[0] for layer in layers]
    fused = path.prepare(torch.cat([layer.weight.data for layer in layers]))
    for layer in layers:
        layer.weight = nn.Parameter(layer.weight.data.new_empty(0), requires_grad=False)
        layer.path = path
    return fused, sizes


class ColumnParallelLinear(_PackableLinear, fs_layers.ColumnParallelLinear):
    """Output features split over ranks (Meta's dim 0); optionally all-gathered."""

    def __init__(self, in_features: int, out_features: int, gather_output: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        self.world = get_model_parallel_world_size()
        self.output_size_per_partition = _split(out_features, "output features")
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, in_features), requires_grad=False)
        self.register_parameter("bias", None)
        self.master_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fairscale's, with the matmul made swappable
        if self.world == 1:  # the collectives are identities: skip their per-call cost on the decode path
            return self._matmul(x)
        out = self._matmul(fs_mappings.copy_to_model_parallel_region(x))
        return fs_mappings.gather_from_model_parallel_region(out) if self.gather_output else out


class RowParallelLinear(_PackableLinear, fs_layers.RowParallelLinear):
    """Input features split over ranks (Meta's dim 1); the partial products are all-reduced."""

    def __init__(self, in_features: int, out_features: int) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, True
        self.world = get_model_parallel_world_size()
        self.input_size_per_partition = _split(in_features, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.input_size_per_partition), requires_grad=False)
        self.register_parameter("bias", None)
        self.master_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # fairscale's, with the matmul made swappable
        out = self._matmul(x)
        return out if self.world == 1 else fs_mappings.reduce_from_model_parallel_region(out)


class ParallelEmbedding(fs_layers.ParallelEmbedding):
    """Embedding split on the embedding dimension (Meta's dim 1); the pieces are all-gathered."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.embedding_dim_per_partition = _split(embedding_dim, "embedding dimension")
        self.weight = nn.Parameter(torch.empty(num_embeddings, self.embedding_dim_per_partition), requires_grad=False)
        self.master_weight = None


def _split(size: int, what: str) -> int:
    world = get_model_parallel_world_size()
    if size % world:
        raise ValueError(f"{what} ({size}) cannot be split over {world} model-parallel processes")
    return size // world


# --- the model ---------------------------------------------------------------------------------------------


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


def rope_tables(head_dim: int, max_pos: int, theta: float) -> torch.Tensor:
    """cos and sin of every position's rotation angles, shape (max_pos, head_dim // 2, 2), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
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


@dataclass
class Placement:
    """Where a call's tokens sit: which cache row and position each token has, and what it may attend to.

    Two layouts. Row layout: tokens (B, S), token (b, s) belongs to cache row b, and attends to that row's cached
    positions allowed by `mask` (B, S, T). Packed layout (a ragged prefill): all prompts concatenated into one
    row (1, N); `segments` gives each prompt's (start, end) in it; every prompt starts at position 0 and
    attends causally within itself, so no padding is computed and no mask is materialised.
    """

    rows: torch.Tensor  # (B, S) cache row of each token
    positions: torch.Tensor  # (B, S) position of each token in its sequence
    mask: Optional[torch.Tensor] = None  # row layout: (B, S, T) which cached positions each token sees
    segments: Optional[List[Tuple[int, int]]] = None  # packed layout


def _row_placement(positions: torch.Tensor, length: int) -> Placement:
    """Row layout for tokens at `positions` (B, S): token (b, s) uses cache row b and sees positions <= its own."""
    bsz, seqlen = positions.shape
    rows = torch.arange(bsz, device=positions.device).unsqueeze(1).expand(bsz, seqlen)
    mask = torch.arange(length, device=positions.device) <= positions.unsqueeze(-1)  # (B, S, length)
    return Placement(rows, positions, mask=mask)


class KVCache(nn.Module):
    """Keys and values of every position so far, preallocated once for (max_batch, kv_heads, max_seq, head_dim)."""

    def __init__(self, max_batch: int, n_kv_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, where: Placement, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, S, H, D) at each token's cache row and position."""
        self.k[where.rows, :, where.positions] = k
        self.v[where.rows, :, where.positions] = v

    def read(self, bsz: int, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.k[:bsz, :, :length], self.v[:bsz, :, :length]


class Attention(nn.Module):
    """Grouped-query self-attention; each rank holds n_heads/M query heads and n_kv_heads/M KV heads."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        world = get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // world
        self.n_local_kv_heads = args.kv_heads // world
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim)
        self.wk = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim)
        self.wv = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim)
        self.cache: Optional[KVCache] = None  # attached by Transformer.setup_cache
        self.qkv_sizes: Optional[List[int]] = None  # set by pack_for_cpu, with the fused weight `qkv`
        self.qkv: Any = None

    def pack_for_cpu(self, path: cpu.LinearPath) -> None:
        self.qkv, self.qkv_sizes = pack_fused([self.wq, self.wk, self.wv], path)
        self.wo.pack_for_cpu(path)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, where: Placement) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        if self.qkv_sizes is not None:
            q, k, v = self.wq.path.linear(x, self.qkv).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = apply_rope(q.view(bsz, seqlen, self.n_local_heads, self.head_dim), rope)
        k = apply_rope(k.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim), rope)
        v = v.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        if self.cache is not None:
            self.cache.update(where, k, v)
        if where.segments is not None:
            out = self._packed(q, k, v, where.segments)
        elif seqlen == 1 and self.cache is not None:
            out = self._single_step(q, *self.cache.read(bsz, where.mask.shape[-1]), where.mask)
        else:
            keys, values = (self.cache.read(bsz, where.mask.shape[-1]) if self.cache is not None
                            else (k.transpose(1, 2), v.transpose(1, 2)))  # no cache: training
            out = self._attend(q.transpose(1, 2), keys, values, mask=where.mask.unsqueeze(1))
        return self.wo(out.reshape(bsz, seqlen, -1))

    def _attend(self, q, keys, values, mask=None, causal=False):
        """q (B, H, S, D) over keys/values (B, KV, T, D): prefill-sized calls, where copying K/V is cheap."""
        if self.n_rep > 1:
            keys, values = keys.repeat_interleave(self.n_rep, 1), values.repeat_interleave(self.n_rep, 1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal).transpose(1, 2)

    def _single_step(self, q, keys, values, mask):
        """One new token per row. Query head h reads KV head h // n_rep; grouping a KV head's n_rep query heads
        along the sequence axis serves them in one attention call without copying K/V n_rep times."""
        bsz = q.shape[0]
        q = q.view(bsz, self.n_local_kv_heads, self.n_rep, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.unsqueeze(1))
        return out.reshape(bsz, 1, self.n_local_heads, self.head_dim)

    def _packed(self, q, k, v, segments):
        """Causal attention within each prompt of a packed (1, N) prefill."""
        outs = [self._attend(q[:, a:b].transpose(1, 2), k[:, a:b].transpose(1, 2), v[:, a:b].transpose(1, 2),
                             causal=True) for a, b in segments]
        return torch.cat(outs, dim=1)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim)
        self.w2 = RowParallelLinear(hidden_dim, dim)
        self.w3 = ColumnParallelLinear(dim, hidden_dim)
        self.w13_sizes: Optional[List[int]] = None  # set by pack_for_cpu, with the fused weight `w13`
        self.w13: Any = None

    def pack_for_cpu(self, path: cpu.LinearPath) -> None:
        self.w13, self.w13_sizes = pack_fused([self.w1, self.w3], path)
        self.w2.pack_for_cpu(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13_sizes is not None:
            gate, up = self.w1.path.linear(x, self.w13).split(self.w13_sizes, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, where: Placement) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, where)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids in, float32 logits out; keeps its own KV cache between calls."""

    def __init__(self, params: ModelArgs) -> None:
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError("Transformer needs a concrete vocab_size (resolve -1 from the tokenizer first)")
        self.params = params
        self.vocab_size, self.n_layers = params.vocab_size, params.n_layers
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, gather_output=True)

    def setup_rope(self, device: Union[str, torch.device]) -> None:
        p = self.params
        self.register_buffer("rope", rope_tables(p.head_dim, p.max_seq_len, p.rope_theta).to(device), persistent=False)

    def setup_cache(self, device: Union[str, torch.device], dtype: torch.dtype) -> None:
        """Allocate the rotary tables and the KV caches on the model's device (after weights are loaded)."""
        p = self.params
        self.setup_rope(device)
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(p.max_batch_size, attn.n_local_kv_heads, p.max_seq_len, p.head_dim, dtype).to(device)

    def pack_for_cpu(self, path: cpu.LinearPath) -> None:
        """Give the linear weights to a CPU kernel path (see llama.cpu), fusing wq/wk/wv and w1/w3. Each original
        weight is released as its packed copy is made, so memory stays near one copy of the model. Afterwards
        the state dict holds empty linear weights: take weights from the checkpoint, not from a packed model."""
        for layer in self.layers:
            layer.attention.pack_for_cpu(path)
            layer.feed_forward.pack_for_cpu(path)
        self.output.pack_for_cpu(path)

    @property
    def has_cache(self) -> bool:
        return self.layers[0].attention.cache is not None

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
        Weights are loaded with requires_grad=False, so no autograd graph is built; `setup_cache` is skipped
        only to train (no cache, start_pos 0, the whole sequence in one call).
        """
        bsz, seqlen = tokens.shape
        if bsz > self.params.max_batch_size:
            raise ValueError(f"batch of {bsz} exceeds max_batch_size {self.params.max_batch_size}")
        start = torch.as_tensor(start_pos, device=tokens.device).reshape(-1).expand(bsz)
        positions = start.unsqueeze(1) + torch.arange(seqlen, device=tokens.device)  # (B, S)
        length = int(positions.max()) + 1
        if int(positions.min()) < 0 or length > self.params.max_seq_len:
            raise ValueError(f"positions up to {length - 1} do not fit max_seq_len {self.params.max_seq_len}")
        if not self.has_cache and int(start.max()) != 0:
            raise ValueError("without a KV cache (setup_cache not called) only start_pos 0 is possible")
        return self._run(tokens, _row_placement(positions, length), logits_at)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """One new token per row: tokens (B,) at positions (B,), all below `length` (a host int, so that this
        step has no data-dependent shapes and no device sync: it is what `compile=True` compiles).
        Returns the next-token logits (B, V)."""
        return self._run(tokens.unsqueeze(1), _row_placement(positions.unsqueeze(1), length), None)[:, 0]

    def prefill(self, prompts: Sequence[Sequence[int]], all_logits: bool = False) -> torch.Tensor:
        """Fill cache rows 0..B-1 with the given prompts in one packed forward pass. No padding is computed,
        however ragged the prompts. Returns the logits (B, V) of each prompt's last token, or with all_logits
        those of every token, (N, V) for the N tokens of all prompts in order."""
        device = self.rope.device
        lengths = [len(p) for p in prompts]
        if len(prompts) > self.params.max_batch_size or max(lengths) > self.params.max_seq_len:
            raise ValueError(f"{len(prompts)} prompts of up to {max(lengths)} tokens do not fit the cache "
                             f"({self.params.max_batch_size} x {self.params.max_seq_len})")
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device).unsqueeze(0)
        rows = torch.repeat_interleave(torch.arange(len(prompts), device=device),
                                       torch.tensor(lengths, device=device)).unsqueeze(0)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)
        ends = list(itertools.accumulate(lengths))
        segments = [(end - n, end) for end, n in zip(ends, lengths)]
        logits_at = None if all_logits else torch.tensor(ends, device=device).unsqueeze(0) - 1
        return self._run(tokens, Placement(rows, positions, segments=segments), logits_at)[0]

    def _run(self, tokens: torch.Tensor, where: Placement, logits_at: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        rope = self.rope[where.positions]
        for layer in self.layers:
            h = layer(h, rope, where)
        if logits_at is not None:
            h = h.gather(1, logits_at.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return self.output(self.norm(h)).float()


def count_parameters(args: ModelArgs) -> int:
    """Parameters of the full (unsplit) model, for memory estimates."""
    d, v, kv = args.dim, args.vocab_size, args.kv_heads * args.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * args.ffn_hidden_dim + 2 * d
    return args.n_layers * per_layer + 2 * v * d + d


__all__ = ["ModelArgs", "Transformer", "RMSNorm", "Attention", "FeedForward", "TransformerBlock", "KVCache",
           "Placement", "count_parameters"]
