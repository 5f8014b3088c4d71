"""Weight-only quantization: int8 per output channel, int4 in groups along the input dim.

Batch-1 decoding streams every weight once per token, so its speed is the weights' bytes over the memory
bandwidth: int8 halves the bytes of bfloat16 and int4 quarters them. Activations stay in the model's dtype;
only the linear layers' weights are quantized (the embeddings and norms stay as they are).

- int8: w = q * scale, q in [-127, 127], one scale per output row (symmetric).
- int4: w = (q - 8) * scale + zero, q in [0, 15], one scale and zero per `group_size` consecutive inputs of a
  row (asymmetric, the layout of PyTorch's "tinygemm" int4 kernels).

Scales and zeros are rounded to bfloat16 before the weights are quantized against them, so the codes are the
best ones for the scales the kernels actually use, and a quantized checkpoint holds exactly what quantizing
at load computes.

The plain form (`QuantizedWeight`) keeps every tensor's output rows on dim 0 and its input columns (bytes,
groups) on dim 1, so it is sliced across ranks, concatenated by fusion and stored in a checkpoint like any
weight. The kernels (`Int8Linear`, `Int4Linear`) are PyTorch's built-in weight-only operators:
``aten._weight_int8pack_mm`` (CPU and CUDA), ``aten._weight_int4pack_mm_for_cpu`` (CPU) and
``aten._weight_int4pack_mm`` (CUDA, bfloat16, compute capability 8.0 or newer). See the README's measurements
for why these and not torchao.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, distributed, hf
from .checkpoint import split_dim
from .layers import ParallelLinear, single_process
from .model import ModelArgs, Transformer, check_positive_int, count_parameters

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
STORED_DTYPE = torch.bfloat16  # scales and zeros, in checkpoints and before the cast to the model's dtype


# --- the settings --------------------------------------------------------------------------------------------


def check_mode(mode: str, group_size: Optional[int]) -> Optional[int]:
    """The group size `mode` uses (None for int8): a ValueError naming a bad mode or group size."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {list(MODES)} or None, got {mode!r}")
    if mode == "int8":
        if group_size is not None:
            raise ValueError(f"group_size applies to int4 only (int8 has one scale per output row), got {group_size!r}")
        return None
    if group_size is None:
        return DEFAULT_GROUP_SIZE
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {list(GROUP_SIZES)} for int4, got {group_size!r}")
    return group_size


# --- the math --------------------------------------------------------------------------------------------------


_CHUNK_ROWS = 2048  # rows quantized at a time: the float32 temporaries stay small whatever the layer


def _round_stored(x: torch.Tensor) -> torch.Tensor:
    return x.to(STORED_DTYPE).float()


def quantize_int8(weight: torch.Tensor, row_amax: Optional[torch.Tensor] = None) -> "QuantizedWeight":
    """Symmetric per-output-row int8: the largest magnitude of each row maps to 127. `row_amax`: that magnitude
    when the row is longer than `weight` holds (a row-parallel rank's slice: the scale is the whole row's)."""
    if row_amax is None:
        row_amax = weight.abs().amax(dim=1)
    scales = _round_stored(row_amax.float().clamp(min=1e-8) / 127)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for lo in range(0, weight.shape[0], _CHUNK_ROWS):
        rows = slice(lo, lo + _CHUNK_ROWS)
        q[rows] = torch.round(weight[rows].float() / scales[rows, None]).clamp_(-127, 127)
    return QuantizedWeight(q, scales.to(STORED_DTYPE), None)


def quantize_int4(weight: torch.Tensor, group_size: int) -> "QuantizedWeight":
    """Asymmetric int4 in groups of `group_size` inputs: each group's minimum and maximum map to codes 0 and 15."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"int4 group_size {group_size} does not divide the {in_features} input features")
    groups = in_features // group_size
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_features, groups, dtype=STORED_DTYPE, device=weight.device)
    zeros = torch.empty_like(scales)
    for lo in range(0, out_features, _CHUNK_ROWS):
        rows = slice(lo, lo + _CHUNK_ROWS)
        w = weight[rows].float().reshape(-1, groups, group_size)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scale = _round_stored((high - low).clamp(min=1e-8) / 15)
        zero = _round_stored(low + 8 * scale)
        codes = torch.round((w - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp_(0, 15)
        packed[rows] = pack_nibbles(codes.reshape(-1, in_features))
        scales[rows], zeros[rows] = scale, zero
    return QuantizedWeight(packed, scales, zeros)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8, the even input column in the high nibble (the CUDA kernel's input)."""
    codes = codes.to(torch.uint8)
    return (codes[:, ::2] << 4) | codes[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) codes 0..15 as uint8."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


class QuantizedWeight(nn.Module):
    """One linear layer's weight (out, in) in the plain quantized form that checkpoints store.

    int8: `qweight` int8 (N, K), `scales` (N,). int4: `qweight` uint8 (N, K/2), two codes per byte, `scales` and
    `zeros` (N, K/group_size). Output rows are dim 0 of every tensor. As a module it computes x @ W.T by
    dequantizing (slowly, but exactly the reference the kernels are tested against); `kernel_for_quantize`
    turns it into a fast kernel. Its buffers are not persistent: a model's state dict stays in Meta's names.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.mode = "int8" if zeros is None else "int4"
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("zeros", zeros, persistent=False)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (1 if self.mode == "int8" else 2)

    @property
    def group_size(self) -> Optional[int]:
        return None if self.mode == "int8" else self.in_features // self.scales.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.mode == "int8":
            return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)
        codes = unpack_nibbles(self.qweight).float().reshape(self.out_features, -1, self.group_size)
        w = (codes - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def state(self, prefix: str) -> Dict[str, torch.Tensor]:
        """Checkpoint entries `<prefix>.weight`, `.scales` (and `.zeros`)."""
        out = {f"{prefix}.weight": self.qweight, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        return out

    @classmethod
    def concat(cls, parts: Sequence["QuantizedWeight"]) -> "QuantizedWeight":
        """The weights stacked on the output rows (fused wq/wk/wv, w1/w3): the same as quantizing the stack,
        since every scale belongs to one row."""
        if len({(p.mode, p.in_features, p.group_size) for p in parts}) != 1:
            raise ValueError("only quantized weights of the same mode, input size and group size can be fused")
        zeros = None if parts[0].zeros is None else torch.cat([p.zeros for p in parts])
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), zeros)


def quantize_weight(weight: torch.Tensor, mode: str, group_size: Optional[int] = None,
                    row_amax: Optional[torch.Tensor] = None) -> QuantizedWeight:
    """The plain quantized form of a float weight (out, in); `row_amax` as in `quantize_int8`."""
    group_size = check_mode(mode, group_size)
    return quantize_int8(weight, row_amax) if mode == "int8" else quantize_int4(weight, group_size)


# --- the kernels -------------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous (tokens, features) matrix, the operators' input."""
    return x.reshape(-1, x.shape[-1]).contiguous()


CUDA_INT8_KERNEL_ROWS = 16  # on CUDA, larger calls (prefill) go through the dense product: see Int8Linear


class Int8Linear(nn.Module):
    """x @ W.T for an int8 weight through ``aten._weight_int8pack_mm`` (it reads the int8 rows directly and
    applies each row's scale to the output). On CUDA that operator is a matrix-vector kernel without tensor
    cores, so calls of more than CUDA_INT8_KERNEL_ROWS tokens (prefill, compute-bound) cast the weight to the
    activations' dtype for one dense product instead, scaling its output."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("qweight", weight.qweight.contiguous(), persistent=False)
        self.register_buffer("scales", weight.scales.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if rows.is_cuda and rows.shape[0] > CUDA_INT8_KERNEL_ROWS:
            out = F.linear(rows, self.qweight.to(rows.dtype)) * self.scales
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scales)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class Int4Linear(nn.Module):
    """x @ W.T for a groupwise int4 weight through PyTorch's tinygemm operators: the codes are repacked once into
    the device's blocked layout, with scales and zeros interleaved as (K/group_size, N, 2)."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.group_size = weight.group_size
        device = weight.qweight.device
        if device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(weight.qweight.contiguous(),
                                                                cuda_inner_k_tiles(weight.in_features))
        else:  # the CPU op takes int32 codes: a few rows at a time (its layout blocks rows by 64), to stay small
            packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpack_nibbles(weight.qweight[lo:lo + _CHUNK_ROWS]).to(torch.int32), 1)
                for lo in range(0, weight.out_features, _CHUNK_ROWS)])
        self.register_buffer("packed", packed, persistent=False)
        scale_zero = torch.stack([weight.scales, weight.zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
        self.register_buffer("scale_zero", scale_zero, persistent=False)
        self._mm = torch.ops.aten._weight_int4pack_mm if device.type == "cuda" else \
            torch.ops.aten._weight_int4pack_mm_for_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._mm(_rows(x), self.packed, self.group_size, self.scale_zero)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def cuda_inner_k_tiles(in_features: int) -> int:
    """The CUDA int4 layout packs 16 * inner_k_tiles inputs per tile: the largest of 8, 4, 2 that divides K."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


# --- where the kernels exist ---------------------------------------------------------------------------------

# The operator each mode's kernel needs on each device type.
_OPERATORS = {("int8", "cpu"): "_weight_int8pack_mm", ("int8", "cuda"): "_weight_int8pack_mm",
              ("int4", "cpu"): "_weight_int4pack_mm_for_cpu", ("int4", "cuda"): "_weight_int4pack_mm"}


def _has_kernel(op: str, device_type: str) -> bool:
    """Whether this PyTorch build registers `op` for the device (a CPU-only build has no CUDA kernels)."""
    if not hasattr(torch.ops.aten, op):
        return False
    has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if has_kernel is None:  # cannot ask: the operator exists, and its first call will say the rest
        return True
    try:
        return bool(has_kernel(f"aten::{op}", "CUDA" if device_type == "cuda" else "CPU"))
    except RuntimeError:
        return False


def check_device(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """A ValueError naming the device or dtype where this build of PyTorch has no kernel for `mode`."""
    op = _OPERATORS.get((mode, device.type))
    if op is None:
        raise ValueError(f"quantize={mode!r} runs on cpu and cuda only, not on device {str(device)!r}")
    if not _has_kernel(op, device.type):
        raise ValueError(f"quantize={mode!r} needs torch.ops.aten.{op} on {device.type}, which this PyTorch "
                         f"({torch.__version__}) does not have")
    if device.type == "cpu" and dtype != torch.bfloat16:
        raise ValueError(f"quantize={mode!r} on a CPU needs dtype bfloat16 (--dtype bfloat16), got {dtype}: "
                         "PyTorch's CPU int8 and int4 kernels are vectorized for bfloat16 activations only (with "
                         "float32 they ran 4 to over 100 times slower than the unquantized model here)")
    if mode == "int4" and device.type == "cuda":
        if dtype != torch.bfloat16:
            raise ValueError(f"quantize='int4' on CUDA needs dtype bfloat16 (its kernel's only one), got {dtype}")
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            raise ValueError(f"quantize='int4' on CUDA needs compute capability 8.0 or newer (Ampere); "
                             f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")


def linear_shapes(args: ModelArgs, world: int) -> Dict[str, tuple]:
    """Each linear layer's (out, in) on one of `world` ranks, as the model runs them (wq/wk/wv and w1/w3 fused)."""

    with torch.device("meta"), single_process():
        model = Transformer(args)
        model.prepare()
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, ParallelLinear):
            shape = [module.out_features, module.in_features]
            shape[module.split_dim] //= world
            shapes[name] = tuple(shape)
    return shapes


def check_layers(args: ModelArgs, world: int, mode: str, group_size: Optional[int],
                 device_type: Optional[str] = None) -> None:
    """Every layer's slice on each of `world` ranks fits the kernels: int4 groups may not straddle two ranks'
    input features, and the int4 layouts block the output rows (16 on CPUs, 8 on CUDA)."""
    if mode != "int4":
        return
    shapes = linear_shapes(args, world)
    bad = {name: k for name, (_, k) in shapes.items() if k % group_size}
    if bad:
        valid = [g for g in GROUP_SIZES if all(k % g == 0 for _, k in shapes.values())]
        name, k = next(iter(bad.items()))
        raise ValueError(f"int4 group_size {group_size} does not divide the {k} input features of {name} on each "
                         f"of {world} process(es): groups may not be split between processes; valid group sizes "
                         f"here: {valid or 'none'}")
    rows = {"cpu": 16, "cuda": 8}.get(device_type or "", 1)
    odd = [f"{name} ({n})" for name, (n, _) in shapes.items() if n % rows]
    if odd:
        raise ValueError(f"int4 on {device_type} needs each process's output rows in multiples of {rows}: "
                         f"{', '.join(odd[:3])} with {world} process(es)")


def kernel_for_quantize(mode: str, device: Union[str, torch.device], dtype: torch.dtype,
                        group_size: Optional[int] = None
                        ) -> Callable[[Union[torch.Tensor, QuantizedWeight]], nn.Module]:
    """The `Transformer.prepare` kernel for `mode`: it quantizes a float weight (or takes a loaded
    QuantizedWeight) and returns the module computing x @ W.T through the device's weight-only operator.
    Raises ValueError for an unknown mode, a bad group size, or a device or dtype without that operator."""
    group_size = check_mode(mode, group_size)
    device = torch.device(device)
    check_device(mode, device, dtype)
    linear = Int8Linear if mode == "int8" else Int4Linear

    def make(weight: Union[torch.Tensor, QuantizedWeight]) -> nn.Module:
        plain = weight if isinstance(weight, QuantizedWeight) else quantize_weight(weight, mode, group_size)
        if (plain.mode, plain.group_size) != (mode, group_size):
            raise ValueError(f"a {plain.mode} weight (group size {plain.group_size}) cannot run as {mode} "
                             f"(group size {group_size})")
        return linear(plain, dtype)

    return make


# --- a model's layers ------------------------------------------------------------------------------------------


def quantize_model(model: nn.Module, mode: str, group_size: Optional[int]) -> None:
    """Replace every linear layer's weight by its plain quantized form, freeing each float weight as it goes
    (call before `prepare`, which fuses and packs them). A row-parallel layer's int8 scales are those of the
    whole rows, taken over the model-parallel group, so every process count gives what a quantized checkpoint
    holds."""

    group_size = check_mode(mode, group_size)
    for module in model.modules():
        if isinstance(module, ParallelLinear) and module.weight is not None:
            weight = module.weight.data
            row_amax = None
            if mode == "int8" and module.split_dim == 1 and module.world > 1:
                row_amax = distributed.model_parallel_max(weight.abs().amax(dim=1).float())
            module.use_kernel(quantize_weight(weight, mode, group_size, row_amax))
            del weight


def take_quantized(state: Dict[str, torch.Tensor]) -> Dict[str, QuantizedWeight]:
    """Remove a quantized checkpoint's layers (`<layer>.weight` + `.scales` [+ `.zeros`]) from `state`, as
    {layer name: QuantizedWeight}; the other entries stay."""
    out = {}
    for key in [k for k in state if k.endswith(".scales")]:
        layer = key[: -len(".scales")]
        if f"{layer}.weight" not in state:
            raise ValueError(f"{key} has no {layer}.weight beside it")
        out[layer] = QuantizedWeight(state.pop(f"{layer}.weight"), state.pop(key), state.pop(f"{layer}.zeros", None))
    return out


def install(model: nn.Module, layers: Dict[str, QuantizedWeight], mode: str, group_size: Optional[int],
            where: str) -> None:
    """Give each named linear layer of `model` (built on the meta device) its loaded quantized weight."""

    for name, plain in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, ParallelLinear):
            raise ValueError(f"{where}: {name}.scales is not the scale of a linear layer")
        expected = tuple(module.weight.shape)
        dtype = torch.int8 if mode == "int8" else torch.uint8
        if plain.qweight.dtype != dtype or (plain.out_features, plain.in_features) != expected or \
                plain.mode != mode or plain.group_size != group_size or plain.scales.shape[0] != expected[0]:
            raise ValueError(f"{where}: {name} is not a {mode} weight of shape {expected} "
                             f"(group size {group_size}): {plain.qweight.dtype} {tuple(plain.qweight.shape)}, "
                             f"scales {tuple(plain.scales.shape)}")
        module.use_kernel(plain)


def parse_entry(entry: object, where: str) -> tuple:
    """(mode, group_size) from params.json's "quantization" entry; a ValueError naming a malformed one."""
    if not isinstance(entry, dict) or set(entry) - {"mode", "group_size"} or "mode" not in entry:
        raise ValueError(f"{where}: \"quantization\" must be an object with \"mode\" and (int4) \"group_size\", "
                         f"got {entry!r}")
    try:
        return entry["mode"], check_mode(entry["mode"], entry.get("group_size"))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def make_entry(mode: str, group_size: Optional[int]) -> Dict[str, object]:
    return {"mode": mode} if mode == "int8" else {"mode": mode, "group_size": group_size}


def weight_bytes(args: ModelArgs, mode: str, group_size: Optional[int], dtype: torch.dtype, world: int) -> int:
    """Bytes of weights each of `world` processes holds: quantized linear layers, everything else in `dtype`."""

    shapes = linear_shapes(args, 1)
    linear = sum(n * k for n, k in shapes.values())
    rest = count_parameters(args) - linear
    per_weight = 1 if mode == "int8" else 0.5 + 2 * STORED_DTYPE.itemsize / group_size
    scales = 0 if mode != "int8" else sum(n for n, _ in shapes.values()) * dtype.itemsize
    return int((linear * per_weight + scales + rest * dtype.itemsize) / world)


# --- quantized checkpoints -------------------------------------------------------------------------------------


def quantize_checkpoint(src_dir: Union[str, Path], dst_dir: Union[str, Path], mode: str,
                        group_size: Optional[int] = None, n_shards: Optional[int] = None,
                        log: Optional[Callable[[str], None]] = None) -> Path:
    """Write the checkpoint in `src_dir` (Meta's layout or Hugging Face's) quantized into the new or empty
    `dst_dir`, in Meta's layout with `n_shards` shards (default: the source's shard count; 1 for Hugging Face).

    Each shard holds `<layer>.weight` (int8, or uint8 with two int4 codes per byte), `<layer>.scales` and (int4)
    `<layer>.zeros` for every linear layer, the embeddings and norms as stored; params.json gains
    ``"quantization": {"mode": ..., "group_size": ...}``. Shards are built one at a time from this rank's slices
    of the source, so memory holds about one bfloat16 shard. All checks come before anything is written."""

    log = log or (lambda message: None)
    group_size = check_mode(mode, group_size)
    reader = hf if hf.is_hf_checkpoint(src_dir) else checkpoint
    info = reader.inspect_checkpoint(src_dir)
    if info.quantization is not None:
        raise ValueError(f"{str(src_dir)!r} is already quantized ({info.quantization}); quantize its bfloat16 "
                         "source instead")
    args = ModelArgs.from_params(info.params)
    args.vocab_size = info.vocab_rows
    n_shards = (info.n_shards if reader is checkpoint else 1) if n_shards is None else n_shards
    try:
        check_positive_int("--mp", n_shards)
    except ValueError as err:
        raise ValueError(f"{err}; valid values: {checkpoint.valid_model_parallel_sizes(args)}") from None
    checkpoint.check_model_parallel_size(args, n_shards)
    check_layers(args, n_shards, mode, group_size)
    if Path(src_dir).resolve() == Path(dst_dir).resolve():
        raise FileExistsError(f"source and destination are the same directory {str(Path(src_dir).resolve())!r}")
    checkpoint.ensure_empty_destination(dst_dir)
    layers = _linear_layers(args)
    row_amax = _row_parallel_amax(reader, info, n_shards, layers) if mode == "int8" and n_shards > 1 else {}
    log(f"quantizing {info.n_shards} shard(s) of {src_dir} to {mode}"
        + (f" (groups of {group_size})" if group_size else "") + f" into {n_shards} shard(s) in {dst_dir}")

    def shards() -> Iterator[Dict[str, torch.Tensor]]:
        for index in range(n_shards):
            start = time.perf_counter()
            state = reader.load_rank_state(info.shards, index, n_shards, mmap=False)
            for layer in layers:
                weight = state.pop(f"{layer}.weight")
                state.update(quantize_weight(weight, mode, group_size, row_amax.get(layer)).state(layer))
                del weight
            size = sum(t.numel() * t.element_size() for t in state.values())
            yield state
            del state
            log(f"  [{index + 1}/{n_shards}] consolidated.{index:02d}.pth: {size / 2**20:.1f} MiB "
                f"in {time.perf_counter() - start:.1f} s")

    params = {**(info.params if reader is checkpoint else args.to_params(vocab_size=-1)),
              "quantization": make_entry(mode, group_size)}
    checkpoint.write_checkpoint(dst_dir, params, shards())
    log(f"done: {dst_dir}")
    return Path(dst_dir)


def _linear_layers(args: ModelArgs) -> List[str]:
    """The checkpoint names of every linear layer (wq ... w3, output), unfused as checkpoints store them."""

    with torch.device("meta"), single_process():
        model = Transformer(args)
    return [name for name, module in model.named_modules() if isinstance(module, ParallelLinear)]


def _row_parallel_amax(reader, info, n_shards: int, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The whole rows' largest magnitudes of the row-parallel layers (split on their input dim), which each
    target shard holds only a slice of: int8 scales are per whole row, the same in every shard."""

    row_parallel = [layer for layer in layers if split_dim(f"{layer}.weight") == 1]
    amax: Dict[str, torch.Tensor] = {}
    for index in range(n_shards):
        state = reader.load_rank_state(info.shards, index, n_shards)
        for layer in row_parallel:
            piece = state[f"{layer}.weight"].abs().amax(dim=1).float()
            amax[layer] = piece if layer not in amax else torch.maximum(amax[layer], piece)
        del state
    return amax


if __name__ == "__main__":  # `python -m llama.quantize`, the old spelling of `python -m llama quantize`
    from .programs.quantize import entry_point

    entry_point()
