"""Writing a checkpoint in Hugging Face's layout: config.json, generation_config.json, the tokenizer's files and
safetensors files of at most `max_shard_bytes`, streamed tensor by tensor (llama.checkpoints.hf reads it)."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import PathLike, atomic_save, ensure_empty_destination as ensure_no_meta_checkpoint, state_shapes
from ..families.base import LLAMA_HF, HFSpec
from .hf import INDEX, MAX_SHARD_BYTES, OTHER_FILES, hf_name
from .source import _SINGLE
from .hf_config import LLAMA2_CONTEXT, SAFETENSORS_DTYPES, _CONFIG, _generation_config, config_from_args
from ..model.transformer import ModelArgs


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
    spec: HFSpec = LLAMA_HF,
) -> List[Path]:
    """Write a Hugging Face directory into the new or empty `folder`; returns the files written, in order.

    `tensors` yields (Hugging Face name, full tensor) in the order of `state_shapes(args)` (rope.freqs left out),
    already in Hugging Face's row order (`to_hf_state`); each is written and dropped before the next is asked
    for. Weights go into safetensors files of at most `max_shard_bytes` (`model.safetensors` when one is enough,
    else `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`). Every file is written under a
    temporary name and renamed when complete: the tokenizer first, then the weights, config.json last, so a
    directory with a config.json is complete. On an error or Ctrl-C the files this call wrote are removed.
    `tokenizer_files`: the family's tokenizer_config.json and special_tokens_map.json (default: Llama 2's);
    `spec`: the family's Hugging Face names and config keys (default: the Llama models').
    """
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in SAFETENSORS_DTYPES]}, got {dtype}")
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"tokenizer model {str(tokenizer_path)!r} does not exist")
    entries = [(hf_name(k, spec), shape) for k, shape in state_shapes(args).items() if k != "rope.freqs"]
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
        save(config_from_args(args, dtype, bos_id, eos_id, max_position_embeddings, spec), _CONFIG)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written
