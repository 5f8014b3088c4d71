"""LoRA adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``), merged
into the weights at load time.

A LoRA adapter replaces a linear weight W (out x in) by W + s * B @ A, with A (r x in), B (out x r) and
s = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). PEFT names its modules as transformers does
(q_proj ... down_proj), so the names go through `hf.meta_name`, and B's rows of q_proj and k_proj are in
Hugging Face's rotary order, so they are un-permuted exactly as the weights are (`hf.from_hf_rows`). Each rank
merges only its own slice of the update: rows of B for a weight split on dim 0, columns of A for one split on
dim 1 (`checkpoint.split_dim`), computed in float32 and added before the sum is cast back.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import torch

from . import hf
from .checkpoint import PathLike, open_shard, read_json_object, split_dim, state_shapes
from ..model.transformer import ModelArgs

# PEFT's module names that map onto this model's linear layers (Llama's seven; never the embeddings or lm_head).
_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# adapter_config.json fields that do not change the merged weights (training, bookkeeping, or the scope of the
# adapter, which its tensors show). Any other field must hold its default (null, false, empty) or is an error.
_IGNORED_FIELDS = {
    "peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "bias", "task_type", "base_model_name_or_path",
    "revision", "inference_mode", "init_lora_weights", "lora_dropout", "auto_mapping", "peft_version",
    "layers_to_transform", "layers_pattern", "exclude_modules", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", "loftq_config",
}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight")


@dataclass
class LoraAdapter:
    """An adapter read and checked against a model's shape: per Meta weight name, its (A, B) in float32, B's
    rows in Hugging Face's order as stored, and the scale of B @ A."""

    path: Path
    r: int
    alpha: float
    scale: float
    weights: Dict[str, Tuple[torch.Tensor, torch.Tensor]]


def _read_adapter_config(path: PathLike) -> Dict[str, Any]:
    """adapter_config.json of an adapter folder, checked: LORA, r, lora_alpha, supported options only. Each
    unsupported option is a ValueError naming the field."""
    folder = Path(path)
    if folder.is_file():
        raise FileNotFoundError(f"LoRA adapter {str(folder)!r} is a file; give the adapter's directory (the one "
                                "holding adapter_config.json)")
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA adapter directory {str(folder)!r} does not exist")
    cfg_path = folder / "adapter_config.json"
    config = read_json_object(folder, cfg_path.name)

    def bad(field: str, why: str) -> ValueError:
        return ValueError(f"{str(cfg_path)!r}: {field} = {json.dumps(config.get(field))} is not supported: {why}")

    if config.get("peft_type", "LORA") != "LORA":
        raise bad("peft_type", "only LoRA adapters are")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise bad("r", "the rank must be a positive integer")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise bad("lora_alpha", "it must be a positive number")
    if not isinstance(config.get("use_rslora", False), bool):
        raise bad("use_rslora", "it must be true or false")
    if config.get("bias", "none") != "none":
        raise bad("bias", "an adapter that trains biases changes weights this model does not have; only "
                          "bias 'none' is")
    if config.get("use_dora"):
        raise bad("use_dora", "DoRA's magnitude vectors are not merged by this loader")
    if config.get("modules_to_save"):
        raise bad("modules_to_save", "an adapter that carries whole modules is not merged by this loader")
    if config.get("fan_in_fan_out"):
        raise bad("fan_in_fan_out", "Llama's linear layers store (out, in) weights")
    for field, value in config.items():
        if field not in _IGNORED_FIELDS and value not in (None, False, {}, [], ""):
            raise bad(field, "this loader merges plain LoRA (r, lora_alpha, use_rslora, target_modules) only")
    return config


def _target_modules(config: Mapping[str, Any], cfg_path: Path, args: ModelArgs) -> List[str]:
    """The module kinds (q_proj ...) target_modules selects; any target outside Llama's seven is an error."""
    targets = config.get("target_modules")
    if targets is None:
        raise ValueError(f"{str(cfg_path)!r}: target_modules is missing")
    if targets == "all-linear":
        return list(_MODULES)
    if isinstance(targets, str):  # PEFT: a regular expression matched against the full module name
        names = [f"model.layers.{i}.{_PARENT[m]}.{m}" for i in range(args.n_layers) for m in _MODULES]
        others = ["model.embed_tokens", "lm_head"]
        wrong = [n for n in others if re.fullmatch(targets, n)]
        chosen = sorted({n.rsplit(".", 1)[1] for n in names if re.fullmatch(targets, n)})
        if wrong or not chosen:
            raise ValueError(f"{str(cfg_path)!r}: target_modules = {json.dumps(targets)} selects "
                             f"{wrong or 'no linear layer of this model'}; only {list(_MODULES)} are supported")
        return chosen
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{str(cfg_path)!r}: target_modules must be a list of module names, got "
                         f"{json.dumps(targets)}")
    unknown = sorted(set(targets) - set(_MODULES))
    if unknown:
        raise ValueError(f"{str(cfg_path)!r}: target_modules {unknown} are not supported: a Llama adapter may "
                         f"target {list(_MODULES)}")
    return sorted(set(targets))


def _read_tensors(folder: Path) -> Tuple[Path, Dict[str, torch.Tensor]]:
    st_path, bin_path = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st_path.is_file():
        from safetensors.torch import load_file

        try:
            return st_path, load_file(str(st_path))
        except Exception as err:  # safetensors raises its own error types for a corrupt file
            raise ValueError(f"{str(st_path)!r} is not a readable safetensors file: {err}") from None
    if bin_path.is_file():
        return bin_path, open_shard(bin_path, mmap=False)  # the one safe torch.load: tensors only, no code
    raise FileNotFoundError(f"no adapter_model.safetensors or adapter_model.bin in {str(folder)!r}")


def read_adapter(path: PathLike, args: ModelArgs) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder and check it against the model `args` describes (vocab_size concrete):
    every tensor a lora_A/lora_B pair of a targeted module of an existing layer, of the shapes this model's
    weights need. Any mismatch (another model's adapter, another rank, unsupported options) is a ValueError
    naming it, raised before any weight of the model is read."""
    folder = Path(path)
    config = _read_adapter_config(folder)
    cfg_path = folder / "adapter_config.json"
    targets = set(_target_modules(config, cfg_path, args))
    r, alpha = config["r"], float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    file, tensors = _read_tensors(folder)
    shapes = state_shapes(args)
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _KEY.fullmatch(name)
        if not match:
            raise ValueError(f"{str(file)!r} holds {name}, which is not a LoRA A/B weight of a Llama linear layer "
                             "(only plain LoRA on q/k/v/o_proj and gate/up/down_proj is supported)")
        layer, parent, module, which = int(match.group(1)), match.group(2), match.group(3), match.group(4)
        key = hf.meta_name(f"model.layers.{layer}.{parent}.{module}.weight")
        if module not in targets or key is None or _PARENT[module] != parent:
            raise ValueError(f"{str(file)!r} holds {name}, for a module that target_modules {sorted(targets)} "
                             "does not name")
        if layer >= args.n_layers:
            raise ValueError(f"{str(file)!r} holds {name} for layer {layer}, but the model has {args.n_layers} "
                             "layers: the adapter was made for another model")
        pairs.setdefault(key, {})[which] = tensor
    if not pairs:
        raise ValueError(f"{str(file)!r} holds no LoRA weights")
    weights: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for key, pair in pairs.items():
        module = hf.hf_name(key).removesuffix(".weight")
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{str(file)!r} holds lora_{''.join(pair)} of {module} without its other half")
        out_features, in_features = shapes[key]
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (r, in_features) or tuple(b.shape) != (out_features, r):
            raise ValueError(f"the adapter's {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but "
                             f"this model needs ({r}, {in_features}) and ({out_features}, {r}) (r = {r}): the "
                             "adapter was made for another model shape")
        weights[key] = (a.float(), b.float())
    return LoraAdapter(folder, r, alpha, scale, dict(sorted(weights.items())))


def lora_factors(adapter: LoraAdapter, key: str, rank: int, world: int,
                 args: ModelArgs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank` of `world`'s slice of the Meta weight `key`'s update as factors (A (r, in), scale * B (out, r)),
    float32, B's rows in Meta's order: rows of B for a weight split on dim 0, columns of A for one split on dim 1."""
    a, b = adapter.weights[key]
    dim = split_dim(key)
    if dim == 0:
        rows = b.shape[0] // world
        b = b[rank * rows:(rank + 1) * rows]
        heads = hf.rotary_heads(key, args)
        if heads is not None:
            b = hf.from_hf_rows(b, heads // world)  # each rank's rows are whole heads
    elif dim == 1:
        cols = a.shape[1] // world
        a = a[:, rank * cols:(rank + 1) * cols]
    return a, b * adapter.scale


def lora_delta(adapter: LoraAdapter, key: str, rank: int, world: int, args: ModelArgs,
               device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Rank `rank` of `world`'s slice of scale * B @ A for the Meta weight `key`, in float32 and Meta's row order."""
    a, b = lora_factors(adapter, key, rank, world, args)
    return b.to(device) @ a.to(device)


def merge_lora(state: Dict[str, torch.Tensor], adapter: LoraAdapter, rank: int, world: int,
               args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Add each adapted weight's update to this rank's slice of it (`load_rank_state`'s output, either layout):
    summed in float32, cast back to the weight's dtype. Replaces the entries of `state` and returns it."""
    for key in adapter.weights:
        if key not in state:
            raise ValueError(f"the adapter changes {key}, which this rank's weights do not hold")
        weight = state[key]
        delta = lora_delta(adapter, key, rank, world, args, weight.device)
        if delta.shape != weight.shape:
            raise ValueError(f"the adapter's update of {key} has shape {tuple(delta.shape)} but this rank's slice "
                             f"is {tuple(weight.shape)}")
        state[key] = (weight.float() + delta).to(weight.dtype)
        del weight, delta
    return state


MAX_RANK = 64  # the largest rank the per-request banks take (llama/model/lora_bank.py)


def factors_for(adapter: LoraAdapter, rank: int, world: int, args: ModelArgs):
    """A function giving, for a list of Meta keys, this rank's factors {key: (A, scale * B)} of those the adapter
    targets (what a LoraBank loads)."""
    def get(keys: List[str]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        return {k: lora_factors(adapter, k, rank, world, args) for k in keys if k in adapter.weights}
    return get
