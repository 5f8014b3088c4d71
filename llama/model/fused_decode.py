"""A CPU decoding step whose layers run in one C call (llama/cpu/csrc/decode.c), for models on the own kernels.

When every linear layer of a one-process CPU model computes through the project's own kernels (int8, int4 or
`own-bf16`), the weights already stream near the memory bandwidth, and what is left of a step is PyTorch's
small operators between them and the Python that calls them: about 8 ms per token at the 1.1B shape on two
cores, a quarter of an int8 step. `FusedDecode` hands the kernels' packed weights, the norm weights, the rotary
tables and the KV cache to one C function that runs every layer, and keeps the embedding lookup, the final norm
and the output projection in PyTorch. Results agree with the layer-by-layer step to bfloat16 rounding (the C
code keeps PyTorch's dtypes; only the order of float additions differs), and each row attends over its own
positions only, so a row's tokens do not depend on the others in the batch. The cache is the paged pool of
llama/model/kv_cache.py: the C code reads each row's block table.
"""

from __future__ import annotations

import ctypes
from typing import List, Optional, Sequence

import torch

from .. import cpu
from ..cpu import qkernels
from . import fused_lora
from .kv_int8 import KVPoolInt8
from .layers import ParallelLinear
from .transformer import Transformer
from ..quant.kernels import Int4Linear, Int8Linear

# The model features (llama.model.args.FEATURE_NAMES, a model's `params.features`) that decode.c implements: a
# model with any other feature decodes layer by layer, told which. A new model option is off the fused step until
# decode.c computes it and its name is added here.
FEATURES = frozenset({"rmsnorm", "swiglu", "rope", "rope-scaling-llama3", "gqa"})

# Rows from which the linear layers leave their matrix-vector kernels (llama.quant.kernels.CPU_PREFILL_ROWS,
# cpu.OWN_BF16_PREFILL_ROWS): a decoding step that large runs layer by layer.
MAX_ROWS = 32


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("isa", ctypes.c_int32), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("group", ctypes.c_int64), ("w", ctypes.c_void_p), ("rscale", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Linear), ("wo", _Linear), ("w13", _Linear), ("w2", _Linear),
                ("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p), ("k", ctypes.c_void_p),
                ("v", ctypes.c_void_p), ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int64), ("dim", ctypes.c_int64), ("n_heads", ctypes.c_int64),
                ("n_kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("max_seq", ctypes.c_int64), ("rows", ctypes.c_int64), ("eps", ctypes.c_float),
                ("rope", ctypes.c_void_p), ("block_size", ctypes.c_int64), ("max_blocks", ctypes.c_int64),
                ("blocks", ctypes.c_int64), ("tables", ctypes.c_void_p), ("lora", ctypes.c_void_p)]


def _describe(layer: Optional[ParallelLinear]) -> Optional[_Linear]:
    """A linear layer as decode.c takes it, or None where it is not on the own kernels."""
    kernel = getattr(layer, "kernel", None)
    if isinstance(kernel, cpu.OwnBf16Linear):
        return _Linear(qkernels.KINDS["bf16"], qkernels.ISAS[kernel.isa], kernel.out_features, layer.in_features, 0,
                       kernel.packed.data_ptr(), None)
    if isinstance(kernel, (Int8Linear, Int4Linear)) and kernel.own is not None:
        own = kernel.own
        return _Linear(own.kind, qkernels.ISAS[own.isa], own.n, own.k, own.group, own.packed.data_ptr(),
                       None if own.rscale is None else own.rscale.data_ptr())
    return None


def why_not(model: Transformer) -> Optional[str]:
    """Why `model` cannot decode through decode.c (None when it can): first a model feature outside FEATURES,
    then how the model is placed and prepared (device, dtype, fused layers on the own kernels)."""
    unsupported = sorted(model.params.features - FEATURES)
    if unsupported:
        return f"model feature(s) {unsupported} not implemented by decode.c (it implements {sorted(FEATURES)})"
    if model.rope.device.type != "cpu" or not model.has_cache:
        return "not a CPU model with a KV cache"
    if model.tok_embeddings.world != 1:
        return "model parallel"
    first = model.layers[0].attention
    if _kv_dtype(first.cache) != torch.bfloat16 or model.norm.weight.dtype != torch.bfloat16:
        return "not bfloat16"
    if model.rope.dtype != torch.float32 or not model.rope.is_contiguous():
        return "rotary tables not contiguous float32"
    if first.cache.block_size != model.tables.block_size or not model.tables.table.is_contiguous():
        return "block tables not as the pool"
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        if attn.wqkv is None or ffn.w13 is None:
            return "layers not fused"
        if any(_describe(lin) is None for lin in (attn.wqkv, attn.wo, ffn.w13, ffn.w2)):
            return "a linear layer not on the own kernels"
    if qkernels.load() is None:  # (the own kernels above imply it; checked last, as it may build the library)
        return f"the C kernels are not available ({qkernels.unavailable()})"
    lanes, top = qkernels.constant("lanes"), qkernels.constant("max_head_dim")
    if first.head_dim % lanes or first.head_dim > top or model.params.dim % lanes:
        return (f"head dimension {first.head_dim} or dim {model.params.dim} (decode.c takes multiples of {lanes}, "
                f"heads up to {top})")
    _check_layout()
    return None


def _kv_dtype(pool) -> torch.dtype:
    """The dtype a pool's reads give: its own, or an int8 pool's (kv_int8.py; decode.c reads its codes and scales)."""
    return pool.dtype if isinstance(pool, KVPoolInt8) else pool.k.dtype


def _scales(pool) -> tuple:
    """decode.c's k_scale and v_scale of a layer's pool: its scales' addresses (int8), else NULL."""
    return (pool.k_scale.data_ptr(), pool.v_scale.data_ptr()) if isinstance(pool, KVPoolInt8) else (None, None)


def _check_layout() -> None:
    """Raise qkernels.KernelMismatch unless the ctypes structures above mirror decode.c's (sizes and offsets)."""
    for struct, name in ((_Linear, "qk_lin_t"), (_Layer, "qk_layer_t"), (_Model, "qk_model_t")):
        qkernels.check_struct(struct, name)


class FusedDecode:
    """`model.decode` for cache rows 0..B-1 (B < MAX_ROWS), the layers in one call of decode.c."""

    def __init__(self, model: Transformer) -> None:
        why = why_not(model)
        if why is not None:
            raise ValueError(f"this model cannot decode through llama/cpu/csrc/decode.c: {why}")
        self.model = model
        self.lib = qkernels.load()
        self.isa = qkernels.ISAS[cpu.quantized_isa() or "scalar"]
        self._describe()
        self._lora: Optional[fused_lora.FusedLora] = None

    @classmethod
    def for_model(cls, model: Transformer) -> Optional["FusedDecode"]:
        """The fused step for `model`, or None where it cannot run (see `why_not`)."""
        return cls(model) if why_not(model) is None else None

    def _describe(self) -> None:
        model, p = self.model, self.model.params
        attn0 = model.layers[0].attention
        layers: List[_Layer] = []
        for layer in model.layers:
            attn, ffn = layer.attention, layer.feed_forward
            layers.append(_Layer(_describe(attn.wqkv), _describe(attn.wo), _describe(ffn.w13), _describe(ffn.w2),
                                 layer.attention_norm.weight.data_ptr(), layer.ffn_norm.weight.data_ptr(),
                                 attn.cache.k.data_ptr(), attn.cache.v.data_ptr(), *_scales(attn.cache)))
        self._layers = (_Layer * len(layers))(*layers)
        tables = model.tables.table
        self._shape = _Model(len(layers), p.dim, attn0.n_local_heads, attn0.n_local_kv_heads, attn0.head_dim,
                             model.layers[0].feed_forward.w2.in_features, p.max_seq_len, tables.shape[0],
                             model.layers[0].attention_norm.eps, model.rope.data_ptr(), model.tables.block_size,
                             tables.shape[1], attn0.cache.k.shape[0], tables.data_ptr())
        self._cache = [(layer.attention.cache.k, layer.attention.cache.v) for layer in model.layers] + [
            (tables, model.rope)]

    @property
    def takes_adapters(self) -> bool:
        """Whether this step adds the model's LoRA adapters itself (llama/model/fused_lora.py), so that steps
        with adapter rows may run here."""
        lora = getattr(self.model, "lora_set", None)
        return lora is None or fused_lora.why_not(lora) is None

    def _adapters(self, bsz: int) -> Optional[int]:
        """decode.c's `lora` for this step: None where no row has an adapter."""
        lora = getattr(self.model, "lora_set", None)
        if lora is None or lora.selection is None:
            return None
        if self._lora is None or not self._lora.current(self.model):
            self._lora = fused_lora.FusedLora(self.model)
        return self._lora.for_step(bsz)

    def _current(self) -> bool:
        now = [(layer.attention.cache.k, layer.attention.cache.v) for layer in self.model.layers] + [
            (self.model.tables.table, self.model.rope)]
        return len(now) == len(self._cache) and all(a is x and b is y for (a, b), (x, y) in zip(now, self._cache))

    def __call__(self, tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Next-token logits (B, V), float32, for tokens (B,) of cache rows 0..B-1 at host-known positions (-1: an
        idle row, written into the null block)."""
        bsz = len(positions)
        if not 0 < bsz < MAX_ROWS or tokens.shape != (bsz,):
            raise ValueError(f"the fused step takes 1..{MAX_ROWS - 1} rows of one token each, got {tuple(tokens.shape)}"
                             f" tokens for {bsz} positions")
        if not self._current():  # the cache was set up again: new buffers
            self._describe()
        model = self.model
        x = model.tok_embeddings(tokens).contiguous()
        pos = torch.tensor(list(positions), dtype=torch.int64)
        self._shape.lora = self._adapters(bsz)
        code = self.lib.qk_decode_layers(qkernels.kernel_threads(), self.isa, ctypes.byref(self._shape),
                                         self._layers, bsz, 0, pos.data_ptr(), x.data_ptr())
        if code:
            raise ValueError(f"decode.c refused the step (error {code}): positions {list(positions)} for "
                             f"{self._shape.rows} rows of up to {self._shape.max_seq} positions in a pool of "
                             f"{self._shape.blocks} blocks")
        return model.output(model.norm(x)).float()
