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

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .checkpoint import Check, CheckpointInfo, PathLike, Reader, _Read, rope_freqs, split_dim, state_shapes
from .hf_config import (  # noqa: F401  (config.json's side, under the names this module always had)
    _CONFIG, LLAMA2_CONTEXT, SAFETENSORS_DTYPES, _generation_config, config_from_args, hf_layout, _params,
    params_from_config)
from .source import INDEX, READERS, Files, describe, with_files  # noqa: F401  (INDEX: as above)
from .source import find_weight_files as _find_weight_files, read_config as _read_config  # noqa: F401  (as above)
from ..families.base import LLAMA_HF, HFSpec
from ..model.transformer import ModelArgs

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
OTHER_FILES = _TOKENIZER_FILES + ("generation_config.json",)  # written besides the weights and config.json
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"

# The names: the family's HFSpec (llama/families/base.py; the Llama models' by default), as
# HF_LAYER_NAMES / HF_TOP_NAMES for the code that always read them here.
HF_LAYER_NAMES: Mapping[str, str] = LLAMA_HF.layer_names
HF_TOP_NAMES: Mapping[str, str] = LLAMA_HF.top_names
# Older conversions stored the rotary tables as buffers; they are recomputed, never read.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# --- names and the rotary permutation ----------------------------------------------------------------------


def hf_name(meta_key: str, spec: HFSpec = LLAMA_HF) -> str:
    """Hugging Face's name of a Meta state-dict entry (layers.3.attention.wq.weight ->
    model.layers.3.self_attn.q_proj.weight; a bias likewise)."""
    match = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", meta_key)
    if match and match.group(2) in spec.layer_names:
        return f"model.layers.{match.group(1)}.{spec.layer_names[match.group(2)]}.{match.group(3)}"
    module, _, kind = meta_key.rpartition(".")
    if kind in ("weight", "bias") and module in spec.top_names:
        return f"{spec.top_names[module]}.{kind}"
    raise ValueError(f"{meta_key!r} has no Hugging Face name")


def meta_name(hf_key: str, spec: HFSpec = LLAMA_HF) -> Optional[str]:
    """Meta's name of a Hugging Face tensor name, None for a name that is not one of the model's weights."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_key)
    layer_names = {v: k for k, v in spec.layer_names.items()}
    if match and match.group(2) in layer_names:
        return f"layers.{match.group(1)}.{layer_names[match.group(2)]}.{match.group(3)}"
    module, _, kind = hf_key.rpartition(".")
    top_names = {v: k for k, v in spec.top_names.items()}
    if kind in ("weight", "bias") and module in top_names:
        return f"{top_names[module]}.{kind}"
    return None


def rotary_heads(meta_key: str, args: ModelArgs) -> Optional[int]:
    """The heads whose rows are in rotary order in `meta_key` (wq: the query heads, wk: the KV heads; their
    weights and biases), else None."""
    if meta_key.endswith((".attention.wq.weight", ".attention.wq.bias")):
        return args.n_heads
    if meta_key.endswith((".attention.wk.weight", ".attention.wk.bias")):
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


def to_hf_state(state: Mapping[str, torch.Tensor], args: ModelArgs, spec: HFSpec = LLAMA_HF
                ) -> Dict[str, torch.Tensor]:
    """Full (unsplit) Meta entries -> Hugging Face's names and row order, in the same order; rope.freqs is dropped
    (transformers computes its own). Any subset of a state dict works, so a model can be converted layer by layer."""
    out: Dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "rope.freqs":
            continue
        heads = rotary_heads(key, args)
        out[hf_name(key, spec)] = tensor if heads is None else _to_hf_rows(tensor, heads)
    return out


# --- reading -----------------------------------------------------------------------------------------------


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from None


def _weight_index(files: Sequence[Path], args: ModelArgs, tied: bool = False, spec: HFSpec = LLAMA_HF
                  ) -> Dict[str, Tuple[Path, str]]:
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
                key = meta_name(name, spec)
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
    missing = [hf_name(k, spec) for k in expected if k not in found]
    if missing or unexpected:
        raise ValueError(f"the safetensors files in {str(files[0].parent)!r} do not hold the Llama model its "
                         f"config.json describes: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return found


class HFReader(Reader):
    """Hugging Face's layout: config.json beside safetensors files (`source.describe` reads config.json). The
    files are memory-mapped and only this rank's slice of each tensor is read; wq and wk are un-permuted slice by
    slice (whole heads); rope.freqs is added as Meta's shards have it."""

    layout, marker = "hf", _CONFIG

    def peek(self, found: Files) -> CheckpointInfo:
        """Meta's params (vocab_size concrete), the embedding rows, and as `shards` the safetensors files, their
        headers checked against config.json (the weight index, kept in the info's header for `read`): every error
        comes before any weight is read."""
        args = ModelArgs.from_params(found.params, arch=found.arch)
        index = _weight_index(found.files, args, bool(found.tied), found.spec or LLAMA_HF)
        return CheckpointInfo(list(found.files), dict(found.params), found.params["vocab_size"], tied=bool(found.tied),
                              arch=args.arch, header=(args, index))

    def info_of(self, files: List[Path]) -> CheckpointInfo:
        """config.json beside the files, and the files' headers checked against it."""
        return self.peek(with_files(describe(files[0].parent, self.layout), files))

    def load(self, found: Files, rank: int, world: int, check: Check, **options: Any) -> Dict[str, torch.Tensor]:
        info = self.peek(found)
        check(info.arch, info.vocab_rows)
        return self.read(info, rank, world, **options)

    def read(self, info: CheckpointInfo, rank: int, world: int, **options: Any) -> Dict[str, torch.Tensor]:
        how = _Read.of(rank, world, **options)
        files = [Path(p) for p in info.shards]
        args, index = info.header
        index = dict(index)
        if info.tied:  # the output is split on the vocabulary rows: this rank's rows of the embedding
            index["output.weight"] = index["tok_embeddings.weight"]
        out: Dict[str, torch.Tensor] = {}
        for done, path in enumerate(files, start=1):
            with _safe_open(path) as handle:
                for key, (where, name) in index.items():
                    if where == path:
                        out[key] = _rank_slice(handle, key, name, args, rank, world, how)
            if how.progress:
                how.progress(done, len(files), path, how.seconds())
        out["rope.freqs"] = rope_freqs(args, how.dtype or out["tok_embeddings.weight"].dtype).to(how.device)
        return out


def _rank_slice(handle: Any, key: str, name: str, args: ModelArgs, rank: int, world: int,
                how: _Read) -> torch.Tensor:
    """Rank `rank`'s slice of tensor `name` (Meta's `key`) from an open safetensors file, in Meta's row order."""
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
    # With mmap a slice the file holds as is stays a view of its mapping (copy-on-write), as Meta's shards do;
    # otherwise, or when permuted, cast or moved, it is a buffer of its own.
    return piece.to(device=how.device, dtype=how.dtype or piece.dtype, copy=not how.mmap,
                    memory_format=torch.contiguous_format)


READER = HFReader()
READERS[READER.layout] = READER
is_hf_checkpoint = READER.claims  # a directory in Hugging Face's layout


def inspect_checkpoint(ckpt_dir: PathLike) -> CheckpointInfo:
    """What `checkpoint.inspect_checkpoint` says of Meta's layout, for a Hugging Face directory (`HFReader`)."""
    return READER.inspect(ckpt_dir)


def load_rank_state(shards: Sequence[PathLike], rank: int, world: int, **options: Any) -> Dict[str, torch.Tensor]:
    """`checkpoint.load_rank_state` for a Hugging Face directory's safetensors files (`HFReader`)."""
    return READER.load_rank_state(shards, rank, world, **options)
