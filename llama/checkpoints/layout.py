"""The model's parameters as checkpoints store them: each entry's full shape and split dim, read once off the
model itself (`model_layout`), and what follows from them (the valid process counts, `rope.freqs`, random
weights for tests and benchmarks). checkpoint.py, hf.py, lora.py, quantize.py and convert.py all ask here.

A column-parallel weight (wq, wk, wv, w1, w3, output) is split on dim 0, a row-parallel one (wo, w2,
tok_embeddings) on dim 1, everything else (norms, rope.freqs) is copied into every shard; a bias splits like
its layer's output rows (a column-parallel layer's: on dim 0; a row-parallel layer's is held whole).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import quant
from ..model import layers
from ..model.transformer import ModelArgs, Transformer


# --- the model's parameters: shapes and split dims, in one place ---------------------------------------------


@dataclass(frozen=True)
class ModelLayout:
    """Every parameter of one model shape: its full (unsplit) shape and the dim it is split on across processes,
    read once off a Transformer built on the meta device (the layers declare their split dims). The one place
    that learns shapes from the model: checkpoints, conversion, LoRA and quantization all ask it."""

    shapes: Dict[str, Tuple[int, ...]]  # the full state dict in Meta's names and the released files' order
    split_dims: Dict[str, Optional[int]]  # each entry's split dim, None where every process holds all of it
    linear: Tuple[str, ...]  # the linear layers as checkpoints store them (wq ... w3, output)
    fused: Dict[str, Tuple[Tuple[int, int], int]]  # the linear layers as the prepared model runs them (wq/wk/wv
    # and w1/w3 fused): full (out, in) and split dim

    def fused_shapes(self, world: int) -> Dict[str, Tuple[int, int]]:
        """Each linear layer's (out, in) on one of `world` processes, as the prepared model runs them."""
        out = {}
        for name, (shape, dim) in self.fused.items():
            piece = list(shape)
            piece[dim] //= world
            out[name] = (piece[0], piece[1])
        return out


_SIZE_ONLY = ("max_seq_len", "max_batch_size")  # a run's settings: they change no parameter's shape


def model_layout(args: ModelArgs) -> ModelLayout:
    """The layout of the model `args` describe (cached per shape; max_seq_len and max_batch_size do not count)."""
    if args.vocab_size < 1:
        raise ValueError("a model's layout needs a concrete vocab_size (the checkpoint's embedding rows)")
    return _layout(tuple((f.name, getattr(args, f.name)) for f in fields(args) if f.name not in _SIZE_ONLY))


@functools.lru_cache(maxsize=16)
def _layout(key: Tuple[Tuple[str, Any], ...]) -> ModelLayout:
    args = ModelArgs(**dict(key))
    with torch.device("meta"), layers.single_process():
        model = Transformer(args)
    modules = dict(model.named_modules())
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    shapes["rope.freqs"] = (args.head_dim // 2,)
    split = {k: getattr(modules.get(k.rpartition(".")[0]), "split_dim", None) for k in shapes}
    linear = tuple(name for name, m in modules.items() if isinstance(m, layers.ParallelLinear))
    model.prepare()  # fuse, as the run does
    fused = {name: ((m.out_features, m.in_features), m.split_dim) for name, m in model.named_modules()
             if isinstance(m, layers.ParallelLinear)}
    return ModelLayout(shapes, split, linear, fused)


@functools.lru_cache(maxsize=None)
def _split_dims() -> Dict[str, int]:
    """Module name (wq, w2, tok_embeddings...) -> split dim, as the model's parallel layers declare it."""
    layout = model_layout(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=8, multiple_of=8))
    return {key.split(".")[-2]: dim for key, dim in layout.split_dims.items() if dim is not None}


def split_dim(key: str, ndim: Optional[int] = None, scheme: Optional[quant.Scheme] = None) -> Optional[int]:
    """The dim a state-dict entry is split on across shards, None where every shard holds all of it.

    A quantized layer's entries other than its codes (`<layer>.scales`, `.zeros`) split as its scheme says
    (`Scheme.entry_split_dim`, given the entry's `ndim`): like the weight, except a per-output-row vector
    (int8's scales) of a layer split on its input dim, which every shard holds whole. Without a scheme, the
    rule every scheme here follows."""
    parts = key.split(".")
    dim = _split_dims().get(parts[-2]) if len(parts) >= 2 else None
    if ndim is None and parts[-1] == "bias":
        ndim = 1
    if dim is None or ndim is None or parts[-1] == "weight":
        return dim
    return (scheme or quant.Scheme).entry_split_dim(parts[-1], dim, ndim)


def valid_model_parallel_sizes(args: ModelArgs) -> List[int]:
    """Process counts M that split every split dimension of this model evenly (heads, KV heads, dim, FFN, vocab).

    M must divide the KV heads, so none above them is ever valid. Llama 2 7B: 1, 2, 4, 8, 16, 32; 13B: 1, 2, 4, 8
    (its FFN, 13824, has no factor 16); 70B (8 KV heads): 1, 2, 4, 8.
    """
    if args.vocab_size < 1:
        raise ValueError("valid_model_parallel_sizes needs a concrete vocab_size (the checkpoint's embedding rows)")
    sizes = (args.n_heads, args.kv_heads, args.dim, args.ffn_hidden_dim, args.vocab_size)
    return [m for m in range(1, args.kv_heads + 1) if all(size % m == 0 for size in sizes)]


def check_model_parallel_size(args: ModelArgs, world: int) -> None:
    """A clear error, naming the valid values, when `world` processes cannot share this model."""
    valid = valid_model_parallel_sizes(args)
    if world not in valid:
        raise ValueError(f"this checkpoint cannot be split over {world} model-parallel processes "
                         f"({args.n_heads} heads, {args.kv_heads} KV heads, dim {args.dim}, "
                         f"FFN {args.ffn_hidden_dim}, vocab {args.vocab_size} must all divide evenly); "
                         f"valid process counts: {valid}")


def state_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Every entry of a full (unsplit) state dict in Meta's naming, with its shape, in the released files' order
    (read off the model itself: `model_layout`)."""
    if args.vocab_size < 1:
        raise ValueError("state_shapes needs a concrete vocab_size (the checkpoint's embedding rows)")
    return dict(model_layout(args).shapes)


def rope_freqs(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The `rope.freqs` entry of Meta's shards: the rotary inverse frequencies (the model recomputes its own)."""
    return (1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))).to(dtype)


def random_state(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """A full (unsplit) random state dict in Meta's naming, for tests and benchmarks.

    Weights are scaled like a trained model's (rows of unit-ish output variance), so activations stay sane and
    greedy decoding is not dominated by ties.
    """
    if args.vocab_size < 1:
        raise ValueError("random_state needs a concrete vocab_size")
    gen = torch.Generator().manual_seed(seed)
    state: Dict[str, torch.Tensor] = {}
    for key, shape in state_shapes(args).items():
        if key == "tok_embeddings.weight":
            state[key] = torch.randn(shape, generator=gen).to(dtype)
        elif key == "rope.freqs":
            state[key] = rope_freqs(args, dtype)
        elif key.endswith(".bias"):
            state[key] = (0.1 * torch.randn(shape, generator=gen)).to(dtype)
        elif len(shape) == 1:  # norms
            state[key] = (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        else:
            state[key] = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(dtype)
    return state
