"""Weight-only quantization schemes as objects: `parse("int4", 64)` -> `Int4Grouped(64)`, which quantizes,
stores, slices, packs and picks its kernel (schemes.py); the plain quantized weight (weight.py); the kernel
modules (kernels.py). Model-level work (a model's layers, quantized checkpoints) is llama/checkpoints/quantize.py's."""

from .schemes import DEFAULT_GROUP_SIZE, GROUP_SIZES, SCHEMES, Int4Grouped, Int8PerRow, Scheme, from_entry, parse
from .weight import QuantizedWeight

__all__ = ["Scheme", "Int8PerRow", "Int4Grouped", "SCHEMES", "parse", "from_entry", "QuantizedWeight",
           "GROUP_SIZES", "DEFAULT_GROUP_SIZE"]
