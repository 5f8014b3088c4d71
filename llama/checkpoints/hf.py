"""Hugging Face's Llama layout: ``config.json`` plus safetensors shards, as in ``meta-llama/Llama-2-7b-hf``.

A directory in this layout is read like a checkpoint in Meta's layout (``checkpoint.py``): `inspect_checkpoint`
and `load_rank_state` here answer exactly what those functions answer there (Meta's params, Meta's tensor
names, each rank's slice), so a loader only has to pick the module by `is_hf_checkpoint`. `write_hf_checkpoint`
writes the layout from Meta's weights.

Two things differ from Meta's layout. The names (`HF_NAMES`). And the order of the rows of wq and wk: Meta's
rotary embedding rotates the interleaved pairs (0, 1), (2, 3), ... of each head, Hugging Face's the two halves
(i, i + head_dim / 2), so the conversion permutes the rows within each head (`to_hf_rows` / `from_hf_rows`).
The permutation never crosses a head, and a rank's rows of wq and wk are whole heads, so a rank's slice is
un-permuted on its own, with its own head count: the same rows as un-permuting the whole matrix and slicing.
How weights are split across ranks is `checkpoint.split_dim`'s table, used here unchanged.
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import (
    CheckpointInfo,
    PathLike,
    atomic_save,
    ensure_empty_destination as ensure_no_meta_checkpoint,
    read_json_object,
    rope_freqs,
    split_dim,
    state_shapes,
)
from ..model.transformer import ModelArgs

_CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
OTHER_FILES = _TOKENIZER_FILES + ("generation_config.json",)  # written besides the weights and config.json
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"
LLAMA2_CONTEXT = 4096  # max_position_embeddings of the Llama 2 models

# Meta's name of a layer's weight -> Hugging Face's (inside "model.layers.N."); then the top-level ones.
HF_LAYER_NAMES: Dict[str, str] = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
HF_TOP_NAMES: Dict[str, str] = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_META_LAYER_NAMES = {v: k for k, v in HF_LAYER_NAMES.items()}
_META_TOP_NAMES = {v: k for k, v in HF_TOP_NAMES.items()}
# Older conversions stored the rotary tables as buffers; they are recomputed, never read.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}  # those written


# --- names and the rotary permutation ----------------------------------------------------------------------


def hf_name(meta_key: str) -> str:
    """Hugging Face's name of a Meta state-dict entry (layers.3.attention.wq.weight ->
    model.layers.3.self_attn.q_proj.weight)."""
    match = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", meta_key)
    if match and match.group(2) in HF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{HF_LAYER_NAMES[match.group(2)]}.weight"
    module = meta_key.removesuffix(".weight")
    if meta_key.endswith(".weight") and module in HF_TOP_NAMES:
        return f"{HF_TOP_NAMES[module]}.weight"
    raise ValueError(f"{meta_key!r} has no Hugging Face name")


def meta_name(hf_key: str) -> Optional[str]:
    """Meta's name of a Hugging Face tensor name, None for a name that is not a Llama weight."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_key)
    if match and match.group(2) in _META_LAYER_NAMES:
        return f"layers.{match.group(1)}.{_META_LAYER_NAMES[match.group(2)]}.weight"
    module = hf_key.removesuffix(".weight")
    if hf_key.endswith(".weight") and module in _META_TOP_NAMES:
        return f"{_META_TOP_NAMES[module]}.weight"
    return None


def rotary_heads(meta_key: str, args: ModelArgs) -> Optional[int]:
    """The heads whose rows are in rotary order in `meta_key` (wq: the query heads, wk: the KV heads), else None."""
    if meta_key.endswith(".attention.wq.weight"):
        return args.n_heads
    if meta_key.endswith(".attention.wk.weight"):
        return args.kv_heads
    return None


def _to_hf_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's row order of a wq/wk matrix (or of any tensor with those rows) -> Hugging Face's.

    Within each head, Meta's rows are (pair, 2): real and imaginary part of each rotary pair side by side;
    Hugging Face's are (2, pair): all first halves, then all second halves."""
    rows = w.shape[0]
    if rows % heads or (rows // heads) % 2:
        raise ValueError(f"{rows} rows cannot be {heads} heads of an even head dimension")
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def from_hf_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's row order of a q_proj/k_proj matrix (or a slice of whole heads) -> Meta's."""
    rows = w.shape[0]
    if rows % heads or (rows // heads) % 2:
        raise ValueError(f"{rows} rows cannot be {heads} heads of an even head dimension")
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_hf_state(state: Mapping[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Full (unsplit) Meta entries -> Hugging Face's names and row order, in the same order; rope.freqs is dropped
    (transformers computes its own). Any subset of a state dict works, so a model can be converted layer by layer."""
    out: Dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "rope.freqs":
            continue
        heads = rotary_heads(key, args)
        out[hf_name(key)] = tensor if heads is None else _to_hf_rows(tensor, heads)
    return out


# --- config.json <-> Meta's params -------------------------------------------------------------------------


def is_hf_checkpoint(ckpt_dir: PathLike) -> bool:
    """A directory in Hugging Face's layout: it has a config.json and no params.json (Meta's layout has that)."""
    folder = Path(ckpt_dir)
    return (folder / _CONFIG).is_file() and not (folder / "params.json").exists()


def _read_config(ckpt_dir: PathLike) -> Dict[str, Any]:
    """config.json of a Hugging Face directory, as a dict (errors name the file)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(folder)!r} does not exist")
    return read_json_object(folder, _CONFIG)


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


def params_from_config(config: Mapping[str, Any], where: str = _CONFIG) -> Dict[str, Any]:
    """Meta's params.json for a Hugging Face Llama config (vocab_size concrete). Anything this model cannot run
    as the config says (rope scaling, tied embeddings, biases, another architecture...) is a ValueError naming
    the field; `where` names the file in messages."""

    def bad(field: str, value: Any, why: str) -> ValueError:
        return ValueError(f"{where}: {field} = {json.dumps(value)} is not supported: {why}")

    archs = config.get("architectures")
    if archs is not None and archs != ["LlamaForCausalLM"]:
        raise bad("architectures", archs, "only LlamaForCausalLM (the Llama architecture) is")
    if config.get("model_type", "llama") != "llama":
        raise bad("model_type", config["model_type"], "only 'llama' is")
    if config.get("quantization_config"):
        raise bad("quantization_config", config["quantization_config"], "only unquantized weights are read")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field) not in (None, False):
            raise bad(field, config[field], "the Llama models have no biases")
    if config.get("tie_word_embeddings") not in (None, False, True):
        raise bad("tie_word_embeddings", config["tie_word_embeddings"], "it must be true or false")
    if config.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", config["hidden_act"], "the Llama feed-forward uses silu")

    def positive_int(field: str, default: Any = None) -> int:
        value = config.get(field, default)
        if value is None:
            raise ValueError(f"{where}: {field} is missing")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {field} must be a positive integer, got {json.dumps(value)}")
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
        if kind == "llama3":
            params.update(_scaled_rope_params(rope, bad, field))
        elif kind != "default":
            raise bad(field, rope, "only rope_type 'default' (plain rotary embeddings) and 'llama3' (Llama 3.1's "
                                   "scaling) are")
        rope_theta = rope.get("rope_theta", rope_theta)
    params["rope_theta"] = rope_theta
    if n_kv_heads != n_heads:
        params["n_kv_heads"] = n_kv_heads
    params.update(_ffn_params(dim, positive_int("intermediate_size")))
    try:
        ModelArgs.from_params(params)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return params


_SCALED_ROPE_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                     "high_freq_factor": "rope_high_freq_factor",
                     "original_max_position_embeddings": "rope_old_context_len"}


def _scaled_rope_params(rope: Mapping[str, Any], bad: Callable[..., ValueError], field: str) -> Dict[str, Any]:
    """params.json keys for a config's rope_type 'llama3' (Llama 3.1's scaling); a factor that is not given is
    not guessed."""
    params: Dict[str, Any] = {"use_scaled_rope": True}
    for hf_key, meta_key in _SCALED_ROPE_KEYS.items():
        value = rope.get(hf_key)
        if value is None:
            raise bad(field, rope, f"rope_type 'llama3' needs {hf_key}")
        params[meta_key] = value
    return params


def config_from_args(args: ModelArgs, dtype: torch.dtype = torch.bfloat16, bos_id: int = 1,
                     eos_id: Union[int, List[int]] = 2, max_position_embeddings: int = LLAMA2_CONTEXT
                     ) -> Dict[str, Any]:
    """config.json of a Llama model in Hugging Face's layout, as the published meta-llama/*-hf files have it
    (rope_theta at the top level, rope_scaling for Llama 3.1's RoPE, and torch_dtype: transformers 4 and 5 both
    read these). The output weight is always written (tie_word_embeddings false), also for a tied checkpoint."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in SAFETENSORS_DTYPES]}, got {dtype}")
    scaling = args.rope_scaling
    rope_scaling = None if scaling is None else {
        "rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor, "original_max_position_embeddings": scaling.old_context_len}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
        "hidden_act": "silu", "rms_norm_eps": args.norm_eps, "rope_theta": float(args.rope_theta),
        "rope_scaling": rope_scaling, "max_position_embeddings": max_position_embeddings, "vocab_size": args.vocab_size,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _generation_config(bos_id: int = 1, eos_id: Union[int, List[int]] = 2,
                      max_position_embeddings: int = LLAMA2_CONTEXT) -> Dict[str, Any]:
    """generation_config.json: this library's sampling defaults (temperature 0.6, top-p 0.9)."""
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
            "max_length": max_position_embeddings}


# --- reading -----------------------------------------------------------------------------------------------


def _find_weight_files(ckpt_dir: PathLike) -> List[Path]:
    """The safetensors files of a Hugging Face directory: those named by model.safetensors.index.json, or
    model.safetensors alone. Errors name missing files, and say so when only PyTorch .bin weights are there."""
    folder = Path(ckpt_dir)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{str(index)!r} is not a safetensors index (no weight_map): {err}") from None
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(index)!r} names weight file(s) missing from {str(folder)!r}: {missing}")
        if not names:
            raise ValueError(f"{str(index)!r} names no weight files")
        return [folder / name for name in names]
    if (folder / _SINGLE).is_file():
        return [folder / _SINGLE]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise FileNotFoundError(f"{str(folder)!r} holds {others} but no {INDEX} saying which weight is where")
    bins = sorted(p.name for p in folder.glob("*.bin"))
    hint = f": it holds {bins}; only safetensors weights are read (save with safe_serialization=True)" if bins else ""
    raise FileNotFoundError(f"no {_SINGLE} or {INDEX} in {str(folder)!r}{hint}")


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from None


def _weight_index(files: Sequence[Path], args: ModelArgs, tied: bool = False) -> Dict[str, Tuple[Path, str]]:
    """Meta key -> (file, Hugging Face name) for every weight the model needs, after checking from the files'
    headers alone (no weight is read) that each is there once, of the right shape, and that nothing else is.
    With tied embeddings there is no output weight to find (a stored lm_head is ignored, as transformers does)."""
    skipped = {"rope.freqs"} | ({"output.weight"} if tied else set())
    expected = {k: v for k, v in state_shapes(args).items() if k not in skipped}
    found: Dict[str, Tuple[Path, str]] = {}
    unexpected: List[str] = []
    for path in files:
        with _safe_open(path) as handle:
            for name in handle.keys():
                key = meta_name(name)
                if key is None or key not in expected:
                    if not _IGNORED.fullmatch(name) and key not in skipped:
                        unexpected.append(name)
                    continue
                if key in found:
                    raise ValueError(f"{name} is stored twice: in {found[key][0].name} and {path.name}")
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected[key]:
                    raise ValueError(f"{name} in {str(path)!r} has shape {shape}, but config.json says "
                                     f"{expected[key]}")
                found[key] = (path, name)
    missing = [hf_name(k) for k in expected if k not in found]
    if missing or unexpected:
        raise ValueError(f"the safetensors files in {str(files[0].parent)!r} do not hold the Llama model its "
                         f"config.json describes: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return found


def _args_of(ckpt_dir: PathLike) -> ModelArgs:
    return ModelArgs.from_params(params_from_config(_read_config(ckpt_dir), f"{Path(ckpt_dir) / _CONFIG}"))


def _tied(config: Mapping[str, Any]) -> bool:
    """The output projection is the input embedding (Llama 3.2 1B, 3B); LlamaConfig's default is untied."""
    return bool(config.get("tie_word_embeddings", False))


def inspect_checkpoint(ckpt_dir: PathLike) -> CheckpointInfo:
    """What `checkpoint.inspect_checkpoint` says of Meta's layout, for a Hugging Face directory: Meta's params
    (vocab_size concrete), the embedding rows, and as `shards` the safetensors files (n_shards counts them).
    Only config.json and the files' headers are read; every error comes before any weight is."""
    config = _read_config(ckpt_dir)
    params = params_from_config(config, f"{Path(ckpt_dir) / _CONFIG}")
    files = _find_weight_files(ckpt_dir)
    _weight_index(files, ModelArgs.from_params(params), _tied(config))
    return CheckpointInfo(files, params, params["vocab_size"], tied=_tied(config))


def load_rank_state(
    shards: Sequence[PathLike],
    rank: int,
    world: int,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    mmap: bool = True,
    progress: Optional[Callable[[int, int, Path, float], None]] = None,
) -> Dict[str, torch.Tensor]:
    """`checkpoint.load_rank_state` for a Hugging Face directory: rank `rank` of `world`'s slice of every weight,
    under Meta's names, in Meta's row order, plus rope.freqs as Meta's shards have it.

    `shards` are the safetensors files of one directory (`inspect_checkpoint(...).shards`); its config.json
    gives the shapes. The files are memory-mapped and only this rank's slice of each tensor is read; wq and wk
    are un-permuted slice by slice (whole heads). With mmap=True a slice needing no change (not permuted, in the
    stored dtype, on CPU) stays a copy-on-write view of the mapping, so one process on CPU copies little but
    wq and wk; mmap=False gives every tensor a buffer of its own, so that a caller replacing tensors one by one
    (weight packing) frees each as it goes. `progress(i, n, path, seconds)` is called after each file.
    """
    if not shards:
        raise ValueError("no safetensors files given")
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"rank {rank!r} of {world!r} processes is not a valid position")
    started = time.perf_counter()
    files = [Path(p) for p in shards]
    args = _args_of(files[0].parent)
    tied = _tied(_read_config(files[0].parent))
    index = _weight_index(files, args, tied)
    if tied:  # the output is split on the vocabulary rows: this rank's rows of the embedding
        index["output.weight"] = index["tok_embeddings.weight"]
    out: Dict[str, torch.Tensor] = {}
    for done, path in enumerate(files, start=1):
        with _safe_open(path) as handle:
            for key, (where, name) in index.items():
                if where != path:
                    continue
                dim = split_dim(key)
                if dim is None:
                    piece = handle.get_tensor(name)
                else:
                    view = handle.get_slice(name)
                    full = view.get_shape()[dim]
                    if full % world:
                        raise ValueError(f"{name} has {full} entries on dim {dim}, not divisible by {world} processes")
                    lo, hi = rank * full // world, (rank + 1) * full // world
                    piece = view[lo:hi] if dim == 0 else view[:, lo:hi]
                heads = rotary_heads(key, args)
                if heads is not None:
                    if heads % world:
                        raise ValueError(f"{heads} heads of {name} cannot be split over {world} processes")
                    piece = from_hf_rows(piece, heads // world)
                # With mmap a slice the file holds as is stays a view of its mapping (copy-on-write), as Meta's
                # shards do; otherwise, or when permuted, cast or moved, it is a buffer of its own.
                out[key] = piece.to(device=device, dtype=dtype or piece.dtype, copy=not mmap,
                                    memory_format=torch.contiguous_format)
        if progress:
            progress(done, len(files), path, time.perf_counter() - started)
    out["rope.freqs"] = rope_freqs(args, dtype or out["tok_embeddings.weight"].dtype).to(device)
    return out


# --- writing -----------------------------------------------------------------------------------------------


def ensure_empty_destination(folder: PathLike, also: Iterable[str] = ()) -> Path:
    """Refuse a folder that holds a checkpoint in either layout (or the remains of an interrupted write), or any
    of the files named in `also`; create it otherwise. Nothing is ever written over."""
    folder = Path(folder)
    if folder.is_dir():
        hf_files = sorted({p.name for p in folder.glob("*.safetensors")}
                          | {name for name in (_CONFIG, INDEX, *also) if (folder / name).exists()})
        if hf_files and _CONFIG not in hf_files and any(n.endswith(".safetensors") for n in hf_files):
            raise FileExistsError(f"{str(folder)!r} holds safetensors files ({hf_files}) but no config.json: an "
                                  "incomplete checkpoint, probably from an interrupted write; refusing to overwrite "
                                  "it: delete it yourself or choose an empty or new directory")
        if hf_files:
            raise FileExistsError(f"{str(folder)!r} already holds {hf_files}; refusing to overwrite: choose an "
                                  "empty or new directory")
    return ensure_no_meta_checkpoint(folder)


def _shard_plan(entries: Sequence[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype,
               max_shard_bytes: int = MAX_SHARD_BYTES) -> List[List[Tuple[str, Tuple[int, ...]]]]:
    """Split (name, shape) entries, in order, into files of at most `max_shard_bytes` (a bigger single tensor
    gets a file of its own)."""
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"the shard size limit must be a positive number of bytes, got {max_shard_bytes!r}")
    files: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append((name, shape))
        size += nbytes
    return files


def _safetensors_writer(entries: Sequence[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype,
                        tensors: Iterator[Tuple[str, torch.Tensor]]) -> Callable[[BinaryIO], None]:
    """A writer for atomic_save that streams one safetensors file: the header (known from the shapes), then each
    tensor's bytes as `tensors` produces it, so only one tensor is in memory at a time."""
    if sys.byteorder != "little":
        raise ValueError("safetensors files are little-endian; writing them on this machine is not supported")
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does

    def write(handle: BinaryIO) -> None:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, shape in entries:
            got_name, tensor = next(tensors, (None, None))
            if tensor is None:
                raise ValueError(f"the source ended before {name}: it holds fewer tensors than its params describe")
            if got_name != name or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"expected {name} of shape {tuple(shape)}, got {got_name} of shape "
                                 f"{tuple(tensor.shape)}: the source does not match its params")
            data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().view(torch.uint8)
            handle.write(memoryview(data.numpy()))
            del tensor, data

    return write


def write_hf_checkpoint(
    folder: PathLike,
    args: ModelArgs,
    tensors: Iterable[Tuple[str, torch.Tensor]],
    tokenizer_path: PathLike,
    dtype: torch.dtype = torch.bfloat16,
    bos_id: int = 1,
    eos_id: Union[int, List[int]] = 2,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    max_position_embeddings: int = LLAMA2_CONTEXT,
    tokenizer_files: Optional[Mapping[str, Any]] = None,
) -> List[Path]:
    """Write a Hugging Face directory into the new or empty `folder`; returns the files written, in order.

    `tensors` yields (Hugging Face name, full tensor) in the order of `state_shapes(args)` (rope.freqs left out),
    already in Hugging Face's row order (`to_hf_state`); each is written and dropped before the next is asked
    for. Weights go into safetensors files of at most `max_shard_bytes` (`model.safetensors` when one is enough,
    else `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`). Every file is written under a
    temporary name and renamed when complete: the tokenizer first, then the weights, config.json last, so a
    directory with a config.json is complete. On an error or Ctrl-C the files this call wrote are removed.
    `tokenizer_files`: the family's tokenizer_config.json and special_tokens_map.json (default: Llama 2's).
    """
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in SAFETENSORS_DTYPES]}, got {dtype}")
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer model {str(tokenizer_path)!r} does not exist")
    entries = [(hf_name(k), shape) for k, shape in state_shapes(args).items() if k != "rope.freqs"]
    plan = _shard_plan(entries, dtype, max_shard_bytes)
    folder = ensure_empty_destination(folder, also=OTHER_FILES)
    names = ([_SINGLE] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    stream = iter(tensors)
    written: List[Path] = []

    def save(obj: Any, name: str) -> None:
        written.append(folder / name)
        atomic_save(obj, folder / name)

    try:
        save(tokenizer_path.read_bytes(), "tokenizer.model")
        if tokenizer_files is None:  # Llama 2's SentencePiece files
            from ..families import LLAMA2

            tokenizer_files = LLAMA2.hf_tokenizer_files(None, max_position_embeddings)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            save(dict(tokenizer_files[name]), name)
        for name, file_entries in zip(names, plan):
            save(_safetensors_writer(file_entries, dtype, stream), name)
        if next(stream, None) is not None:
            raise ValueError("the source holds more tensors than its params describe")
        if len(plan) > 1:
            total = sum(math.prod(shape) * dtype.itemsize for _, shape in entries)
            save({"metadata": {"total_size": total},
                  "weight_map": {entry: name for name, file_entries in zip(names, plan) for entry, _ in file_entries}},
                 INDEX)
        save(_generation_config(bos_id, eos_id, max_position_embeddings), "generation_config.json")
        save(config_from_args(args, dtype, bos_id, eos_id, max_position_embeddings), _CONFIG)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
