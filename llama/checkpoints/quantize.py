"""Weight-only quantization of a model and of checkpoints, in any scheme of llama/quant.

What a scheme is (int8 per output row, int4 in groups: the math, the stored entries, the kernels) lives in
llama/quant; here is what applies a scheme to a model's linear layers (at load, or from a quantized
checkpoint's stored codes), sizes a quantized model, and writes quantized checkpoints. The names this module
had before the schemes became objects (`quantize_weight(w, "int8")`, `Int8Linear`, `check_mode`...) stay
importable from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch import nn

from . import checkpoint
from ..model import distributed
from .checkpoint import split_dim
from ..model.layers import ParallelLinear
from ..model.transformer import ModelArgs, count_parameters
from .rewrite import check_distinct, check_shard_count, write_shards
from .source import Checkpoint
from ..quant import SCHEMES, Int4Grouped, Int8PerRow, Scheme, from_entry, parse
from ..quant.kernels import (  # noqa: F401  (the kernels' names, as this module had them)
    CPU_PREFILL_ROWS, CUDA_INT8_KERNEL_ROWS, DEQUANTIZED_TILE, Int4Linear, Int8Linear, cuda_inner_k_tiles,
    own_kernel_isa, quantized_matmul)
from ..quant.schemes import DEFAULT_GROUP_SIZE, GROUP_SIZES, has_operator  # noqa: F401
from ..quant.weight import STORED_DTYPE, QuantizedWeight, pack_nibbles, unpack_nibbles  # noqa: F401

MODES = tuple(SCHEMES)  # the schemes' user-facing names


# --- the settings, by name -------------------------------------------------------------------------------------


def check_mode(mode: Union[str, Scheme], group_size: Optional[int]) -> Optional[int]:
    """The group size `mode` uses (None for int8): a ValueError naming a bad mode or group size."""
    return parse(mode, group_size).group_size


def quantize_weight(weight: torch.Tensor, mode: Union[str, Scheme], group_size: Optional[int] = None,
                    row_amax: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """The plain quantized form of a float weight (out, in) in the named scheme; `row_amax` as in
    `Scheme.quantize`."""
    return parse(mode, group_size).quantize(weight, row_amax)


def quantize_int8(weight: torch.Tensor, row_amax: Optional[torch.Tensor] = None) -> QuantizedWeight:
    return Int8PerRow().quantize(weight, row_amax)


def quantize_int4(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    return Int4Grouped(group_size).quantize(weight)


def check_device(mode: Union[str, Scheme], device: torch.device, dtype: torch.dtype) -> None:
    """A ValueError naming the device or dtype where this build of PyTorch has no kernel for `mode`."""
    parse(mode, None).check_device(torch.device(device), dtype)


# --- a model's layers ------------------------------------------------------------------------------------------


def linear_shapes(args: ModelArgs, world: int) -> Dict[str, tuple]:
    """Each linear layer's (out, in) on one of `world` ranks, as the model runs them (wq/wk/wv and w1/w3 fused)."""
    return checkpoint.model_layout(args).fused_shapes(world)


def check_layers(args: ModelArgs, world: int, mode: Union[str, Scheme], group_size: Optional[int] = None,
                 device_type: Optional[str] = None) -> None:
    """Every layer's slice on each of `world` ranks fits the scheme's kernels (int4: groups may not straddle two
    ranks' input features, and its layouts block the output rows: 16 on CPUs, 8 on CUDA)."""
    parse(mode, group_size).check_shapes(linear_shapes(args, world), world, device_type)


def kernel_for_quantize(mode: Union[str, Scheme], device: Union[str, torch.device], dtype: torch.dtype,
                        group_size: Optional[int] = None, isa: Optional[str] = "auto"
                        ) -> Callable[[Union[torch.Tensor, QuantizedWeight]], nn.Module]:
    """The `Transformer.prepare` kernel for a scheme (or its name): it quantizes a float weight (or takes a loaded
    QuantizedWeight) and returns the module computing x @ W.T (the project's CPU kernels where they run, else
    the device's weight-only operator; `isa` forces one: an instruction set name, or None for PyTorch's
    operator). Raises ValueError for an unknown mode, a bad group size, or a device or dtype without that
    operator."""
    scheme = parse(mode, group_size)
    scheme.check_device(torch.device(device), dtype)

    def make(weight: Union[torch.Tensor, QuantizedWeight]) -> nn.Module:
        plain = weight if isinstance(weight, QuantizedWeight) else scheme.quantize(weight)
        if plain.scheme != scheme:
            raise ValueError(f"a {plain.scheme.describe()} weight cannot run as {scheme.describe()}")
        return scheme.kernel(plain, dtype, isa)

    return make


def quantize_model(model: nn.Module, mode: Union[str, Scheme], group_size: Optional[int] = None) -> None:
    """Replace every linear layer's weight by its plain quantized form, freeing each float weight as it goes
    (call before `prepare`, which fuses and packs them). A row-parallel layer's per-row scales (int8) are those
    of the whole rows, taken over the model-parallel group, so every process count gives what a quantized
    checkpoint holds."""

    scheme = parse(mode, group_size)
    for module in model.modules():
        if isinstance(module, ParallelLinear) and module.weight is not None:
            weight = module.weight.data
            row_amax = None
            if scheme.whole_row_scales and module.split_dim == 1 and module.world > 1:
                row_amax = distributed.model_parallel_max(weight.abs().amax(dim=1).float())
            module.use_kernel(scheme.quantize(weight, row_amax))
            del weight


def take_quantized(state: Dict[str, torch.Tensor], scheme: Scheme, where: str = "checkpoint"
                   ) -> Dict[str, QuantizedWeight]:
    """Remove a quantized checkpoint's layers (`<layer>.weight` + `.scales` and the scheme's other entries) from
    `state`, as {layer name: QuantizedWeight}; the other entries stay."""
    return {key[: -len(".scales")]: scheme.take(state, key[: -len(".scales")], where)
            for key in [k for k in state if k.endswith(".scales")]}


def install(model: nn.Module, layers: Dict[str, QuantizedWeight], scheme: Scheme, where: str) -> None:
    """Give each named linear layer of `model` (built on the meta device) its loaded quantized weight."""

    for name, plain in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, ParallelLinear):
            raise ValueError(f"{where}: {name}.scales is not the scale of a linear layer")
        scheme.check_stored(plain, tuple(module.weight.shape), name, where)
        module.use_kernel(plain)


def parse_entry(entry: object, where: str) -> tuple:
    """(mode, group_size) from params.json's "quantization" entry; a ValueError naming a malformed one."""
    scheme = from_entry(entry, where)
    return scheme.name, scheme.group_size


def make_entry(mode: Union[str, Scheme], group_size: Optional[int] = None) -> Dict[str, object]:
    return parse(mode, group_size).entry()


def weight_bytes(args: ModelArgs, mode: Union[str, Scheme], group_size: Optional[int], dtype: torch.dtype,
                 world: int) -> int:
    """Bytes of weights each of `world` processes holds: quantized linear layers, everything else in `dtype`."""

    scheme = parse(mode, group_size)
    shapes = linear_shapes(args, 1)
    rest = count_parameters(args) - sum(n * k for n, k in shapes.values())
    quantized = sum(scheme.layer_bytes(n, k, dtype) for n, k in shapes.values())
    return int((quantized + rest * dtype.itemsize) / world)


# --- quantized checkpoints -------------------------------------------------------------------------------------


def quantize_checkpoint(src_dir: Union[str, Path], dst_dir: Union[str, Path], mode: Union[str, Scheme],
                        group_size: Optional[int] = None, n_shards: Optional[int] = None,
                        log: Optional[Callable[[str], None]] = None) -> Path:
    """Write the checkpoint in `src_dir` (Meta's layout or Hugging Face's) quantized into the new or empty
    `dst_dir`, in Meta's layout with `n_shards` shards (default: the source's shard count; 1 for Hugging Face).

    Each shard holds the scheme's entries for every linear layer: `<layer>.weight` (int8, or uint8 with two int4
    codes per byte), `<layer>.scales` and (int4) `<layer>.zeros`; the embeddings and norms as stored.
    params.json gains the scheme's entry, ``"quantization": {"mode": ..., "group_size": ...}``. Shards are built
    one at a time from this rank's slices of the source, so memory holds about one bfloat16 shard. All checks
    come before anything is written."""

    log = log or (lambda message: None)
    scheme = parse(mode, group_size)
    ckpt = Checkpoint.open(src_dir)
    if ckpt.quantization is not None:
        raise ValueError(f"{str(src_dir)!r} is already quantized ({ckpt.quantization}); quantize its bfloat16 "
                         "source instead")
    args, meta = ckpt.args, ckpt.layout == "meta"
    n_shards = (ckpt.n_shards if meta else 1) if n_shards is None else n_shards
    check_shard_count(n_shards, ckpt.valid_worlds, ckpt.check_world)
    scheme.check_shapes(linear_shapes(args, n_shards), n_shards, None)
    check_distinct(src_dir, dst_dir)
    checkpoint.ensure_empty_destination(dst_dir)
    layers = checkpoint.model_layout(args).linear
    row_amax = _row_parallel_amax(ckpt, n_shards, layers) if scheme.whole_row_scales and n_shards > 1 else {}
    log(f"quantizing {ckpt.n_shards} shard(s) of {src_dir} to {scheme.describe()} into {n_shards} shard(s) in "
        f"{dst_dir}")

    def shard(index: int) -> Dict[str, torch.Tensor]:
        state = ckpt.load_rank_state(index, n_shards, mmap=False)
        for layer in layers:
            weight = state.pop(f"{layer}.weight")
            state.update(scheme.quantize(weight, row_amax.get(layer)).state(layer))
            del weight
        return state

    params = {**(ckpt.params if meta else args.to_params(vocab_size=-1)),
              "quantization": scheme.entry()}
    write_shards(dst_dir, params, n_shards, shard, log)
    log(f"done: {dst_dir}")
    return Path(dst_dir)


def _row_parallel_amax(ckpt: Checkpoint, n_shards: int, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The whole rows' largest magnitudes of the row-parallel layers (split on their input dim), which each
    target shard holds only a slice of: per-row scales (int8) are per whole row, the same in every shard."""

    row_parallel = [layer for layer in layers if split_dim(f"{layer}.weight") == 1]
    amax: Dict[str, torch.Tensor] = {}
    for index in range(n_shards):
        state = ckpt.load_rank_state(index, n_shards)
        for layer in row_parallel:
            piece = state[f"{layer}.weight"].abs().amax(dim=1).float()
            amax[layer] = piece if layer not in amax else torch.maximum(amax[layer], piece)
        del state
    return amax
