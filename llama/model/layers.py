"""The model-parallel layers: each holds this rank's slice of one weight and says on which dim it is split.

Meta's checkpoints store column-parallel weights (wq, wk, wv, w1, w3, output) split on dim 0 and row-parallel
ones (wo, w2, tok_embeddings) on dim 1; `split_dim` on each class is that fact, and checkpoint.py reads it
from here. The collectives are fairscale's mappings; at one process they are skipped. A layer's matrix product
can be handed to a prepared `kernel` (a packed or quantized copy of the weight) once the weight is loaded.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as fs_init
from fairscale.nn.model_parallel import mappings
from torch import nn

_forced_world: Optional[int] = None


def model_parallel_world() -> int:
    """The model-parallel process count layers are built for: fairscale's group, or 1 outside any group."""
    if _forced_world is not None:
        return _forced_world
    return fs_init.get_model_parallel_world_size() if fs_init.model_parallel_is_initialized() else 1


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Build layers at full size whatever group this process is in (to read the model's structure)."""
    global _forced_world
    saved, _forced_world = _forced_world, 1
    try:
        yield
    finally:
        _forced_world = saved


def _local(size: int, world: int, what: str) -> int:
    if size % world:
        raise ValueError(f"{what} ({size}) cannot be split over {world} model-parallel processes")
    return size // world


class ParallelLinear(nn.Module):
    """y = x W^T (+ b) with W (out_features, in_features) split over ranks on `split_dim`; the Llama models have
    no bias b (a family's ArchSpec may ask for one). `weight` is this rank's slice, in Meta's layout; `bias` this
    rank's slice of b on a column-parallel layer, all of it on a row-parallel one (added once, after the sum). `use_kernel` replaces it by a module computing the same
    product from a prepared form (oneDNN-packed, quantized), after which `weight` is None.
    """

    split_dim: int

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.world = model_parallel_world()
        shape = [out_features, in_features]
        shape[self.split_dim] = _local(shape[self.split_dim], self.world,
                                       "output features" if self.split_dim == 0 else "input features")
        self.weight: Optional[nn.Parameter] = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.bias: Optional[nn.Parameter] = nn.Parameter(torch.empty(shape[0]), requires_grad=False) if bias \
            else None
        self.kernel: Optional[nn.Module] = None
        self.lora = None  # a LoraBank (llama/model/lora_bank.py): per-token adapters beside the base product

    def use_kernel(self, kernel: nn.Module) -> None:
        self.kernel = kernel
        self.weight = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight) if self.kernel is None else self.kernel(x)
        return y if self.lora is None else self.lora.add(x, y)


class ColumnParallelLinear(ParallelLinear):
    """Output features split over ranks; each rank computes its share, all-gathered when `gather_output`."""

    split_dim = 0

    def __init__(self, in_features: int, out_features: int, gather_output: bool = False, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x if self.world == 1 else mappings.copy_to_model_parallel_region(x))
        if self.bias is not None:
            out = out + self.bias
        return mappings.gather_from_model_parallel_region(out) if self.world > 1 and self.gather_output else out


class RowParallelLinear(ParallelLinear):
    """Input features split over ranks (the input arrives split); the partial products are all-reduced."""

    split_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        out = out if self.world == 1 else mappings.reduce_from_model_parallel_region(out)
        return out if self.bias is None else out + self.bias


class ParallelEmbedding(nn.Module):
    """Token embeddings split on the embedding dim; the pieces are all-gathered."""

    split_dim = 1

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.world = model_parallel_world()
        local = _local(embedding_dim, self.world, "embedding dimension")
        self.weight = nn.Parameter(torch.empty(num_embeddings, local), requires_grad=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return F.embedding(tokens, self.weight)
        out = F.embedding(mappings.copy_to_model_parallel_region(tokens), self.weight)
        return mappings.gather_from_model_parallel_region(out)


def fuse_columns(layers: Sequence[ColumnParallelLinear]) -> ColumnParallelLinear:
    """One column-parallel layer computing several that read the same input (wq/wk/wv, w1/w3): one larger
    product streams the weights faster than several small ones. Split its output with `fused_sizes(layers)`.
    The layers hold plain weights, or kernels of one type that can be stacked on their output rows (a
    quantized checkpoint's weights: `concat`). The originals are released as the fused copy is made."""
    kernels = [layer.kernel for layer in layers]
    plain = all(layer.weight is not None for layer in layers)
    stackable = all(k is not None for k in kernels) and len({type(k) for k in kernels}) == 1 and \
        hasattr(kernels[0], "concat")
    if not (plain or stackable) or any(layer.gather_output for layer in layers):
        raise ValueError("only plain (or stackable), ungathered column-parallel layers can be fused")
    in_features = layers[0].in_features
    biased = [layer.bias is not None for layer in layers]
    if any(biased) and not all(biased):
        raise ValueError("column-parallel layers with and without a bias cannot be fused")
    with torch.device("meta"):
        fused = ColumnParallelLinear(in_features, sum(layer.out_features for layer in layers), bias=all(biased))
    fused.world = layers[0].world
    if fused.bias is not None and not layers[0].bias.is_meta:  # on the meta device (a layout) its own will do
        fused.bias = nn.Parameter(torch.cat([layer.bias.data for layer in layers]), requires_grad=False)
    if plain:
        weights = [layer.weight.data for layer in layers]
        # Meta weights (a model's layout being computed, checkpoints.model_layout) hold no data: torch.cat on them
        # would import torch._dynamo for its meta kernel, 1 to 7 seconds of a multi-shard load.
        joined = torch.empty((sum(w.shape[0] for w in weights), *weights[0].shape[1:]), dtype=weights[0].dtype,
                             device="meta") if weights[0].is_meta else torch.cat(weights)
        fused.weight = nn.Parameter(joined, requires_grad=False)
    else:
        fused.use_kernel(type(kernels[0]).concat(kernels))
    for layer in layers:
        layer.weight = layer.kernel = layer.bias = None
    return fused


def fused_sizes(layers: Sequence[ParallelLinear]) -> List[int]:
    return [layer.out_features // layer.world for layer in layers]
