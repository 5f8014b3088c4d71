"""Convert a checkpoint between Meta's layout and Hugging Face's, in either direction.

    python -m llama convert SRC_DIR DST_DIR [--to hf|meta] [--mp N] [--dtype D] [--tokenizer_path PATH]

The direction follows from SRC_DIR (a config.json means Hugging Face's layout) unless --to says it.

Meta -> Hugging Face: safetensors files of at most --max_shard_size (5GB) plus model.safetensors.index.json,
config.json, generation_config.json and the tokenizer (tokenizer.model, tokenizer_config.json,
special_tokens_map.json); transformers' `AutoModelForCausalLM.from_pretrained(DST_DIR)` loads the result.
The source is read one layer at a time from its memory-mapped shards, whatever their number, and each tensor is
written as soon as it is converted, so memory holds about one layer. tokenizer.model is taken from
--tokenizer_path, else from SRC_DIR or the folder above it (where download.sh puts it).

Hugging Face -> Meta: --mp N consolidated.NN.pth shards (default 1) plus params.json, and tokenizer.model
when SRC_DIR has one; one target shard is in memory at a time.

The weights keep their dtype unless --dtype says otherwise. Every file is written under a temporary name, synced
and renamed when complete, the file that marks a checkpoint complete last (config.json; params.json), and
DST_DIR must not already hold a checkpoint of either layout: nothing is ever overwritten.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .. import families
from ..families.base import HFSpec
from . import hf, hf_write
from .checkpoint import (
    PathLike,
    atomic_save,
    check_model_parallel_size,
    find_shards,
    inspect_checkpoint,
    open_shard,
    split_dim,
    state_shapes,
    valid_model_parallel_sizes,
)
from .rewrite import check_distinct, check_shard_count, write_shards
from ..model.transformer import ModelArgs
from ..tokenizer import Tokenizer

_Log = Callable[[str], None]


def _parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (as transformers' max_shard_size); also KB, MB, GiB, MiB... or a plain byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", str(text), re.I)
    if not match:
        raise ValueError(f"--max_shard_size must be a size such as 5GB or 500MB, got {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "b").lower().rstrip("b") or "b"
    scale = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    size = int(number * scale)
    if size < 1:
        raise ValueError(f"--max_shard_size must be positive, got {text!r}")
    return size


def _default_tokenizer(src_dir: PathLike) -> Path:
    """tokenizer.model in the checkpoint folder, else in the folder above it (download.sh's layout)."""
    candidates = [Path(src_dir) / "tokenizer.model", Path(src_dir).resolve().parent / "tokenizer.model"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no tokenizer.model in {str(candidates[0].parent)!r} or the folder above it; give "
                            "--tokenizer_path")


def _meta_layers(shards: List[Path], args: ModelArgs, spec: HFSpec) -> Iterator[Tuple[str, torch.Tensor]]:
    """The full tensors of a Meta checkpoint of any shard count, in Hugging Face's names and row order, one group
    at a time (the embeddings, each layer, the final norm and output): shards are memory-mapped anew for each
    group and only that group's slices are read and joined along checkpoint.split_dim."""
    groups: List[List[str]] = [["tok_embeddings.weight"]]
    groups += [[k for k in state_shapes(args) if k.startswith(f"layers.{i}.")] for i in range(args.n_layers)]
    groups.append(["norm.weight", "output.weight"])
    for keys in groups:
        sources = [open_shard(path) for path in shards]
        full: Dict[str, torch.Tensor] = {}
        for key in keys:
            # A checkpoint with tied embeddings (Llama 3.2 1B, 3B) stores no output: its output is the embedding.
            stored = key if key != "output.weight" or key in sources[0] else "tok_embeddings.weight"
            dim = split_dim(stored)
            full[key] = sources[0][stored] if dim is None else torch.cat([src[stored] for src in sources], dim=dim)
        del sources
        for name, tensor in hf.to_hf_state(full, args, spec).items():
            yield name, tensor
        del full


def _check_meta_shards(shards: List[Path], args: ModelArgs) -> torch.dtype:
    """Every shard holds its piece of every weight, of the right shape (read from the headers only); returns the
    stored dtype."""
    expected = state_shapes(args)
    for path in shards:
        src = open_shard(path)
        for key, shape in expected.items():
            if key == "rope.freqs" or (key == "output.weight" and key not in src):  # tied embeddings
                continue
            if key not in src:
                raise ValueError(f"{str(path)!r} has no {key}: not a complete Llama checkpoint")
            piece = list(shape)
            if split_dim(key) is not None:
                piece[split_dim(key)] //= len(shards)
            if tuple(src[key].shape) != tuple(piece):
                raise ValueError(f"{key} in {str(path)!r} has shape {tuple(src[key].shape)}; params.json and "
                                 f"{len(shards)} shard(s) say {tuple(piece)}")
        dtype = src["tok_embeddings.weight"].dtype
        del src
    return dtype


def meta_to_hf(src_dir: PathLike, dst_dir: PathLike, tokenizer_path: Optional[PathLike] = None,
               dtype: Optional[torch.dtype] = None, max_shard_bytes: int = hf.MAX_SHARD_BYTES,
               max_position_embeddings: Optional[int] = None, log: Optional[_Log] = None,
               family: Optional[str] = None) -> Path:
    """Write Meta's checkpoint in `src_dir` in Hugging Face's layout into the new or empty `dst_dir`.

    Every check (the source's files and shapes, the tokenizer's vocabulary against the embedding rows, the
    destination) comes before anything is written. The family (detected, or `family`) gives the special tokens,
    the tokenizer's files and, by default, max_position_embeddings (the context it was trained for)."""
    log = log or (lambda message: None)
    info = inspect_checkpoint(src_dir)
    if info.quantization is not None:
        raise ValueError(f"{str(src_dir)!r} is quantized ({info.quantization}); Hugging Face's layout takes float "
                         "weights: convert its bfloat16 source")
    args = ModelArgs.from_params(info.params, arch=info.arch)
    args.vocab_size = info.vocab_rows
    tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else _default_tokenizer(src_dir)
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.n_words != info.vocab_rows:
        raise ValueError(f"tokenizer {str(tokenizer_path)!r} has {tokenizer.n_words} tokens but the checkpoint in "
                         f"{str(src_dir)!r} has {info.vocab_rows} embedding rows: they do not belong together")
    found = families.detect(tokenizer, info.params, family, info.arch)
    if max_position_embeddings is None:
        max_position_embeddings = found.context_for(info.params)
    stored = _check_meta_shards(info.shards, args)
    dtype = dtype or stored
    if dtype not in hf.SAFETENSORS_DTYPES:
        raise ValueError(f"the weights are {dtype}; --dtype must be one of bfloat16, float16, float32")
    check_distinct(src_dir, dst_dir)
    hf_write.ensure_empty_destination(dst_dir, also=hf.OTHER_FILES)
    log(f"converting {info.n_shards} shard(s) of {src_dir} to Hugging Face's layout in {dst_dir} "
        f"({str(dtype).removeprefix('torch.')}, files of at most {max_shard_bytes / 1e9:g} GB)")
    start = time.perf_counter()
    written = hf_write.write_hf_checkpoint(dst_dir, args, _meta_layers(info.shards, args, found.hf), tokenizer_path, dtype,
                                     tokenizer.bos_id, _one_or_list(found.hf_eos_ids(tokenizer)), max_shard_bytes,
                                     max_position_embeddings, found.hf_tokenizer_files(tokenizer,
                                                                                       max_position_embeddings),
                                     found.hf)
    for path in written:
        if path.suffix == ".safetensors":
            log(f"  {path.name}: {path.stat().st_size / 2**20:.1f} MiB")
    log(f"done in {time.perf_counter() - start:.1f} s: {dst_dir}")
    return Path(dst_dir)


def hf_to_meta(src_dir: PathLike, dst_dir: PathLike, n_shards: int = 1, dtype: Optional[torch.dtype] = None,
               log: Optional[_Log] = None) -> Path:
    """Write the Hugging Face directory `src_dir` as `n_shards` consolidated.NN.pth shards plus params.json (and
    its tokenizer.model) into the new or empty `dst_dir`. Checks come before anything is written."""
    log = log or (lambda message: None)
    info = hf.inspect_checkpoint(src_dir)
    args = ModelArgs.from_params(info.params, arch=info.arch)
    check_shard_count(n_shards, lambda: valid_model_parallel_sizes(args),
                      lambda n: check_model_parallel_size(args, n))
    tokenizer = Path(src_dir) / "tokenizer.model"
    if tokenizer.is_file():
        Tokenizer(tokenizer)  # a readable SentencePiece model, or an error now
    check_distinct(src_dir, dst_dir)
    dst = hf_write.ensure_empty_destination(dst_dir, also=("tokenizer.model",))
    log(f"converting {info.n_shards} safetensors file(s) of {src_dir} to {n_shards} shard(s) of Meta's layout in "
        f"{dst_dir}" + (f" ({str(dtype).removeprefix('torch.')})" if dtype else ""))

    copied = None
    try:
        if tokenizer.is_file():
            copied = dst / "tokenizer.model"
            atomic_save(tokenizer.read_bytes(), copied)
        # vocab_size -1 as in Meta's released params.json: the embedding rows say it.
        write_shards(dst, args.to_params(vocab_size=-1), n_shards,
                     lambda index: hf.load_rank_state(info.shards, index, n_shards, dtype=dtype, mmap=False), log)
    except BaseException:
        if copied is not None:
            copied.unlink(missing_ok=True)
        raise
    log(f"done: {dst_dir}")
    return dst


def _one_or_list(ids: List[int]):
    return ids[0] if len(ids) == 1 else ids




def convert(src_dir: PathLike, dst_dir: PathLike, to: Optional[str] = None, n_shards: Optional[int] = None,
            dtype: Optional[torch.dtype] = None, tokenizer_path: Optional[PathLike] = None,
            max_shard_bytes: int = hf.MAX_SHARD_BYTES, log: Optional[_Log] = None,
            family: Optional[str] = None) -> Path:
    """Convert `src_dir` into the other layout (or the one `to` names: 'hf' or 'meta') in `dst_dir`."""
    if not Path(src_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(src_dir)!r} does not exist")
    source = "hf" if hf.is_hf_checkpoint(src_dir) else "meta"
    if source == "meta":
        find_shards(src_dir)  # a clear error when the folder is neither layout
    to = to or ("meta" if source == "hf" else "hf")
    if to not in ("hf", "meta"):
        raise ValueError(f"--to must be 'hf' or 'meta', got {to!r}")
    if to == source:
        what = "Hugging Face's layout (it has a config.json)" if source == "hf" else "Meta's layout"
        hint = "; to change its shard count use python -m llama reshard" if source == "meta" else ""
        raise ValueError(f"{str(src_dir)!r} is already in {what}: nothing to convert{hint}")
    if to == "meta":
        if tokenizer_path is not None:
            raise ValueError("--tokenizer_path is for --to hf; the tokenizer.model of a Hugging Face directory "
                             "is copied as is")
        return hf_to_meta(src_dir, dst_dir, 1 if n_shards is None else n_shards, dtype, log)
    if n_shards is not None:
        raise ValueError("--mp is for --to meta: Hugging Face's files are not split by process "
                         "(Llama.build slices them for any valid process count)")
    return meta_to_hf(src_dir, dst_dir, tokenizer_path, dtype, max_shard_bytes, log=log, family=family)
