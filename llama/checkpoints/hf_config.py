"""Hugging Face's config.json and generation_config.json against Meta's params.json: the one map between the two
(read by llama.checkpoints.hf, written by llama.checkpoints.hf_write)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Tuple, Union

import torch

from .. import families
from ..engine.params import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from ..families.base import LLAMA_HF, HFSpec
from ..model.args import ArchSpec, ModelArgs

_CONFIG = "config.json"
LLAMA2_CONTEXT = 4096  # max_position_embeddings of the Llama 2 models
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}  # those written


# --- config.json <-> Meta's params -------------------------------------------------------------------------


def _ffn_params(dim: int, hidden: int) -> Dict[str, Any]:
    """multiple_of (and ffn_dim_multiplier) that make Meta's rounding rule give `hidden`, the FFN size.

    config.json stores the size itself; params.json a rule for it. The released choices come first, so the Llama
    2 models get back their own params.json (7B, 13B: multiple_of 256; 70B: 4096 with a multiplier of 1.3); any
    other size gets an equivalent rule."""
    candidates = [(256, None), (4096, 1.3)]
    candidates += [(1 << k, None) for k in range(hidden.bit_length(), -1, -1) if hidden % (1 << k) == 0]
    base = int(2 * (4 * dim) / 3)
    candidates.append((hidden, None if base <= hidden else hidden / base))
    for multiple_of, multiplier in candidates:
        args = ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
        if args.ffn_hidden_dim == hidden:
            return {"multiple_of": multiple_of, **({} if multiplier is None else {"ffn_dim_multiplier": multiplier})}
    raise ValueError(f"intermediate_size {hidden} cannot be expressed in params.json for hidden_size {dim}")


@contextmanager
def named(where: str) -> Iterator[None]:
    """Prefix a ValueError raised inside with the file it is about: the conversions here answer about a config's
    contents, the code that read the file names it."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def from_config(config: Mapping[str, Any]) -> Tuple[HFSpec, ArchSpec, Dict[str, Any]]:
    """What a config.json says, checked: its family layout and architecture options (`hf_layout`) and Meta's params
    for it (`params_from_config`); a ValueError naming the field (the caller names the file, `named`)."""
    spec, arch = _layout(config)
    return spec, arch, _params(config)


def hf_layout(config: Mapping[str, Any], where: str = _CONFIG) -> Tuple[HFSpec, ArchSpec]:
    """The family layout a config.json is in (families.hf_spec: its architecture) and the architecture options
    it asks for, which some family read through that layout must declare (Family.arch): a ValueError naming the
    field otherwise (and the file, `where`)."""
    with named(where):
        return _layout(config)


def params_from_config(config: Mapping[str, Any], where: str = _CONFIG) -> Dict[str, Any]:
    """Meta's params.json for a Hugging Face Llama config (vocab_size concrete). Anything this model cannot run
    as the config says (rope scaling, tied embeddings, biases no family has, another architecture...) is a
    ValueError naming the field; `where` names the file in messages. The architecture options are `hf_layout`'s."""
    with named(where):
        return from_config(config)[2]


def tied(config: Mapping[str, Any]) -> bool:
    """The output projection is the input embedding (Llama 3.2 1B, 3B); LlamaConfig's default is untied."""
    return bool(config.get("tie_word_embeddings", False))


def _layout(config: Mapping[str, Any]) -> Tuple[HFSpec, ArchSpec]:
    spec = families.hf_spec(config)
    arch = spec.arch_from_config(config)
    if config.get("hidden_act", spec.hidden_act) != spec.hidden_act:
        raise ValueError(f"hidden_act = {json.dumps(config['hidden_act'])} is not supported: the "
                         f"{spec.architecture} feed-forward uses {spec.hidden_act}")
    allowed = families.arch_options(spec)
    if arch not in allowed:
        key = next((k for k, option in spec.arch_keys.items()
                    if getattr(arch, option) and not any(getattr(a, option) for a in allowed)), next(iter(spec.arch_keys)))
        raise ValueError(f"{key} = {json.dumps(config.get(key))} is not supported: no family read as "
                         f"{spec.architecture} has {arch.describe()} (theirs: {[a.describe() for a in allowed]})")
    return spec, arch


def _params(config: Mapping[str, Any]) -> Dict[str, Any]:
    """params_from_config's conversion, for a config whose layout `_layout` has checked."""

    def bad(field: str, value: Any, why: str) -> ValueError:
        return ValueError(f"{field} = {json.dumps(value)} is not supported: {why}")

    if config.get("quantization_config"):
        raise bad("quantization_config", config["quantization_config"], "only unquantized weights are read")
    if config.get("tie_word_embeddings") not in (None, False, True):
        raise bad("tie_word_embeddings", config["tie_word_embeddings"], "it must be true or false")

    def positive_int(field: str, default: Any = None) -> int:
        value = config.get(field, default)
        if value is None:
            raise ValueError(f"{field} is missing")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field} must be a positive integer, got {json.dumps(value)}")
        return value

    dim, n_heads = positive_int("hidden_size"), positive_int("num_attention_heads")
    n_kv_heads = positive_int("num_key_value_heads", n_heads)
    if dim % n_heads:
        raise bad("num_attention_heads", n_heads, f"hidden_size {dim} is not a multiple of it")
    if n_heads % n_kv_heads:
        raise bad("num_key_value_heads", n_kv_heads, f"it must divide num_attention_heads {n_heads}")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise bad("head_dim", head_dim, f"Llama 2's head dimension is hidden_size / num_attention_heads = "
                                        f"{dim // n_heads}")
    rope_theta = config.get("rope_theta", 10000.0)
    params: Dict[str, Any] = {"dim": dim, "n_layers": positive_int("num_hidden_layers"), "n_heads": n_heads,
                              "vocab_size": positive_int("vocab_size"),
                              "norm_eps": config.get("rms_norm_eps", 1e-6)}
    # transformers 4 says rope_scaling (and rope_theta at the top level), transformers 5 rope_parameters.
    for field in ("rope_scaling", "rope_parameters"):
        rope = config.get(field)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise bad(field, rope, "it must be an object")
        kind = rope.get("rope_type", rope.get("type", "default"))
        owner = None if kind == "default" else families.rope_family(kind)
        if owner is not None:
            try:
                params.update(owner.rope_from_hf(rope))
            except ValueError as err:
                raise bad(field, rope, str(err)) from None
        elif kind != "default":
            known = [f"{f.hf_rope_type!r} ({f.title}'s scaling)" for f in families.FAMILIES.values() if f.hf_rope_type]
            raise bad(field, rope, f"only rope_type 'default' (plain rotary embeddings) and {', '.join(known)} are")
        rope_theta = rope.get("rope_theta", rope_theta)
    params["rope_theta"] = rope_theta
    if n_kv_heads != n_heads:
        params["n_kv_heads"] = n_kv_heads
    params.update(_ffn_params(dim, positive_int("intermediate_size")))
    ModelArgs.from_params(params)
    return params


def config_from_args(args: ModelArgs, dtype: torch.dtype = torch.bfloat16, bos_id: int = 1,
                     eos_id: Union[int, List[int]] = 2, max_position_embeddings: int = LLAMA2_CONTEXT,
                     spec: HFSpec = LLAMA_HF) -> Dict[str, Any]:
    """config.json of a Llama model in Hugging Face's layout, as the published meta-llama/*-hf files have it
    (rope_theta at the top level, rope_scaling for Llama 3.1's RoPE, and torch_dtype: transformers 4 and 5 both
    read these). The output weight is always written (tie_word_embeddings false), also for a tied checkpoint."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in SAFETENSORS_DTYPES]}, got {dtype}")
    scaling = args.rope_scaling  # the family whose scaling it is writes it (Llama 3's rope_type 'llama3')
    rope_scaling = None if scaling is None else families.rope_family().rope_to_hf(scaling)  # type: ignore[union-attr]
    return {
        **spec.config_of(args.arch),
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps, "rope_theta": float(args.rope_theta),
        "rope_scaling": rope_scaling, "max_position_embeddings": max_position_embeddings, "vocab_size": args.vocab_size,
        "attention_dropout": 0.0, "pretraining_tp": 1,
        "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _generation_config(bos_id: int = 1, eos_id: Union[int, List[int]] = 2,
                      max_position_embeddings: int = LLAMA2_CONTEXT) -> Dict[str, Any]:
    """generation_config.json: this library's sampling defaults (llama.engine.params)."""
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True, "temperature": DEFAULT_TEMPERATURE,
            "top_p": DEFAULT_TOP_P, "max_length": max_position_embeddings}
