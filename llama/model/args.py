"""What a model is, as data: its hyper-parameters (ModelArgs, as Meta's params.json), the architecture options a
family declares (ArchSpec), Llama 3.1's RoPE scaling, the released shapes and what they cost in memory.

Nothing here computes: transformer.py builds the model these describe; families/ and checkpoints/ read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, FrozenSet, Mapping, Optional, Tuple

import torch


@dataclass(frozen=True)
class ArchSpec:
    """The architecture options a family can differ in beyond params.json's sizes: one flag per option the model
    implements. A family declares its own (`Family.arch`); a checkpoint's files say which it has (biases stored or
    not, Hugging Face's config keys), and the two must agree. The defaults are the Llama models'."""

    attention_bias: bool = False  # biases on wq, wk, wv and wo (Hugging Face's attention_bias)
    mlp_bias: bool = False  # biases on w1, w2 and w3 (Hugging Face's mlp_bias)

    def describe(self) -> str:
        on = [f.name for f in fields(self) if getattr(self, f.name)]
        return ", ".join(on) if on else "no biases"


# The features a model can use, by name: what the fused C step (fused_decode.FEATURES) lists as implemented.
FEATURE_NAMES = ("rmsnorm", "swiglu", "rope", "rope-scaling-llama3", "gqa", "attention-bias", "mlp-bias")


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
    # Llama 3.1's long-context RoPE (params.json: use_scaled_rope; the factors as llama-models names them, None:
    # RopeScaling's defaults, those of Llama 3.1).
    use_scaled_rope: bool = False
    rope_scaling_factor: Optional[float] = None
    rope_high_freq_factor: Optional[float] = None
    rope_low_freq_factor: Optional[float] = None
    rope_old_context_len: Optional[int] = None
    max_batch_size: int = 32
    max_seq_len: int = 2048
    arch: ArchSpec = field(default_factory=ArchSpec)  # the family's options (not a params.json key)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> "ModelArgs":
        """Build from a params.json mapping; an unknown key is an error naming it (a typo must not pass)."""
        known = {f.name for f in fields(cls)} - {"arch"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"params.json has unknown key(s) {unknown}; known keys are {sorted(known)}")
        args = cls(**{**params, **overrides})
        args.validate()
        return args

    def to_params(self, vocab_size: Optional[int] = None) -> Dict[str, Any]:
        """params.json contents, in the released files' style (they say vocab_size -1)."""
        params: Dict[str, Any] = {"dim": self.dim, "multiple_of": self.multiple_of, "n_heads": self.n_heads,
                                  "n_layers": self.n_layers, "norm_eps": self.norm_eps,
                                  "vocab_size": self.vocab_size if vocab_size is None else vocab_size}
        optional = {"n_kv_heads": None, "ffn_dim_multiplier": None, "rope_theta": 10000.0, "use_scaled_rope": False,
                    "rope_scaling_factor": None, "rope_high_freq_factor": None, "rope_low_freq_factor": None,
                    "rope_old_context_len": None}
        params.update({k: getattr(self, k) for k, default in optional.items() if getattr(self, k) != default})
        return params

    @property
    def rope_scaling(self) -> Optional["RopeScaling"]:
        """The frequency scaling of Llama 3.1 and later, None for plain rotary embeddings."""
        if not self.use_scaled_rope:
            return None
        given = {"factor": self.rope_scaling_factor, "high_freq_factor": self.rope_high_freq_factor,
                 "low_freq_factor": self.rope_low_freq_factor, "old_context_len": self.rope_old_context_len}
        return RopeScaling(**{k: v for k, v in given.items() if v is not None})

    @property
    def features(self) -> FrozenSet[str]:
        """The model's features by name (FEATURE_NAMES): what a step that implements only some must check."""
        found = {"rmsnorm", "swiglu", "rope"}
        if self.use_scaled_rope:
            found.add("rope-scaling-llama3")
        if self.kv_heads != self.n_heads:
            found.add("gqa")
        if self.arch.attention_bias:
            found.add("attention-bias")
        if self.arch.mlp_bias:
            found.add("mlp-bias")
        return frozenset(found)

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
            check_positive_int(name, getattr(self, name))
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for rotary embeddings")
        if not isinstance(self.kv_heads, int) or self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads {self.n_kv_heads!r} must be a positive divisor of n_heads {self.n_heads}")
        if not (isinstance(self.vocab_size, int) and (self.vocab_size == -1 or self.vocab_size > 0)):
            raise ValueError(f"vocab_size must be -1 or a positive integer, got {self.vocab_size!r}")
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
            value = getattr(self, name)
            if value is None and name == "ffn_dim_multiplier":
                continue
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.arch, ArchSpec):
            raise ValueError(f"arch must be an ArchSpec, got {self.arch!r}")
        if not isinstance(self.use_scaled_rope, bool):
            raise ValueError(f"use_scaled_rope must be true or false, got {self.use_scaled_rope!r}")
        scaling = ("rope_scaling_factor", "rope_high_freq_factor", "rope_low_freq_factor", "rope_old_context_len")
        for name in scaling:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.use_scaled_rope:
            self.rope_scaling.check()
        elif any(getattr(self, name) is not None for name in scaling):
            raise ValueError(f"{[n for n in scaling if getattr(self, n) is not None]} set without use_scaled_rope")


def check_positive_int(name: str, value: Any) -> int:
    """The one positive-integer check: a ValueError naming the argument and its bad value."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


# Shapes of the released models (their params.json) and of the 1.1B shape used by the benchmarks, as data.
PRESETS = {
    "1.1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256, vocab_size=32000),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, vocab_size=32000),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, vocab_size=32000),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                vocab_size=32000),
}


def count_parameters(args: ModelArgs) -> int:
    """Parameters of the full (unsplit) model."""
    d, v, kv = args.dim, args.vocab_size, args.kv_heads * args.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * args.ffn_hidden_dim + 2 * d
    per_layer += (2 * d + 2 * kv) * args.arch.attention_bias + (2 * args.ffn_hidden_dim + d) * args.arch.mlp_bias
    return args.n_layers * per_layer + 2 * v * d + d


def memory_per_process(args: ModelArgs, dtype: torch.dtype, world: int,
                       tokens: Optional[int] = None) -> Tuple[int, int]:
    """Bytes of weights and of KV cache that each of `world` model-parallel processes holds; the cache for
    `tokens` positions (default: max_batch_size full contexts)."""
    weights = count_parameters(args) * dtype.itemsize // world
    if tokens is None:
        tokens = args.max_batch_size * args.max_seq_len
    cache = 2 * args.n_layers * tokens * args.kv_heads * args.head_dim * dtype.itemsize // world
    return weights, cache



@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's rotary frequency scaling (defaults: its published values). Wavelengths shorter than
    old_context_len / high_freq_factor keep their frequency, those longer than old_context_len /
    low_freq_factor are slowed down `factor` times, and those between blend the two smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    old_context_len: int = 8192

    def check(self) -> None:
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"RoPE scaling: high_freq_factor {self.high_freq_factor} must exceed low_freq_factor "
                             f"{self.low_freq_factor}")

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        wavelength = 2 * math.pi / inv_freq
        ratio = self.old_context_len / wavelength  # how many of its wavelengths the old context held
        blend = ((ratio - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)).clamp(0, 1)
        return (1 - blend) * inv_freq / self.factor + blend * inv_freq


__all__ = ["ArchSpec", "FEATURE_NAMES", "ModelArgs", "RopeScaling", "PRESETS", "check_positive_int", "count_parameters",
           "memory_per_process"]
