"""The model wing: the Transformer's math (transformer.py), the paged KV cache (kv_cache.py), its model-parallel
layers (layers.py), process groups (distributed.py) and the decoding step (decode_step.py, fused_decode.py for the C step on a CPU).

`llama.model` keeps the released reference's names (`from llama.model import ModelArgs, Transformer`)."""

from .kv_cache import BlockTables, KVPool, Packed, Rows
from .args import ArchSpec
from .transformer import (PRESETS, Attention, FeedForward, ModelArgs, RMSNorm, RopeScaling, Transformer,
                          TransformerBlock, apply_rope, check_positive_int, count_parameters, memory_per_process,
                          rope_tables)

__all__ = ["ArchSpec", "ModelArgs", "Transformer", "RMSNorm", "Attention", "FeedForward", "TransformerBlock", "KVPool", "BlockTables",
           "count_parameters", "check_positive_int", "memory_per_process", "PRESETS", "RopeScaling", "rope_tables",
           "apply_rope", "Rows", "Packed"]
