"""Meta's checkpoint layout: ``consolidated.NN.pth`` shards plus ``params.json``, and the one reader interface.

`Reader` is what every layout's reader answers (`MetaReader` here, `hf.HFReader` for Hugging Face's): what a
folder holds from its headers alone (`inspect`), and any of M processes' slices of its weights under Meta's
names (`load_rank_state`). How each weight is split is layout.py's table; from it this module gives any of M
processes its slice of a checkpoint of S shards; writing.py writes checkpoints of any shard count (resharding,
test fixtures).
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from .. import quant
from ..model.args import ArchSpec
from .layout import (  # noqa: F401  (the names this module always had)
    ModelLayout, check_model_parallel_size, model_layout, random_state, rope_freqs, split_dim, state_shapes,
    valid_model_parallel_sizes)
from .source import (  # noqa: F401  (find_shards, read_json_object, read_params: the names this module always had)
    READERS, Files, describe, find_shards, layout_of, read_json_object, read_params)
from .writing import atomic_save, ensure_empty_destination, split_state, write_checkpoint  # noqa: F401  (as above)

PathLike = Union[str, os.PathLike]


# --- reading ---------------------------------------------------------------------------------------------


def open_shard(path: PathLike, mmap: bool = True) -> Dict[str, torch.Tensor]:
    """Memory-map one shard (or read it, each tensor in its own buffer, with mmap=False): the library's one
    torch.load. weights_only: a checkpoint is data, and a pickle that would run code is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to load {str(path)!r}: it is not a plain tensor checkpoint "
                         f"(loading it would run code or it is corrupt): {str(err).splitlines()[0]}") from None
    except RuntimeError as err:
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    return state


@dataclass
class CheckpointInfo:
    """What can be learned about a checkpoint without reading its weights."""

    shards: List[Path]
    params: Dict[str, Any]
    vocab_rows: int  # rows of tok_embeddings: the vocabulary the weights were trained with
    quantization: Optional[Dict[str, Any]] = None  # params.json's "quantization" entry (llama.quantize wrote it)
    tied: bool = False  # no output weight stored: the output projection is tok_embeddings (Llama 3.2 1B, 3B)
    arch: ArchSpec = field(default_factory=ArchSpec)  # the architecture options the files hold (biases)
    header: Any = field(default=None, repr=False, compare=False)  # what the reader parsed, for its `read`

    @property
    def n_shards(self) -> int:
        return len(self.shards)


Progress = Callable[[int, int, Path, float], None]


class Reader:
    """The one interface of a layout's reader. `peek` reads the weights' headers (shapes, the options the stored
    tensors show: every error before any weight is read) into a CheckpointInfo; `read` gives, from it, rank `rank`
    of `world`'s slice of every stored tensor under Meta's names, in Meta's row order, cast to `dtype` (floating
    entries), on `device`; `load` is the two in a row, with the caller's `check` of the headers between them.
    With mmap=True a slice the files hold as is stays a copy-on-write view of their mapping; mmap=False gives
    every tensor a buffer of its own, so that a caller replacing tensors one by one (weight packing) frees each as
    it goes. `progress(i, n, path, seconds)` is called after each file read; `scheme` is a quantized
    checkpoint's (it says how its entries split). Each layout's reader implements them in its own module."""

    layout = ""  # "meta" or "hf": for messages
    marker = ""  # the file that marks the layout

    def claims(self, ckpt_dir: PathLike) -> bool:
        """Whether `ckpt_dir` is in this reader's layout (source.layout_of)."""
        return (Path(ckpt_dir) / self.marker).exists() and layout_of(ckpt_dir) == self.layout

    def inspect(self, ckpt_dir: PathLike) -> "CheckpointInfo":
        """What the folder holds, its weights' headers included (no weight is read)."""
        return self.peek(describe(ckpt_dir, self.layout))

    def peek(self, found: Files) -> "CheckpointInfo":
        raise NotImplementedError

    def info_of(self, files: List[Path]) -> "CheckpointInfo":
        """What `read` needs of these files (of one checkpoint), when only the files are given."""
        raise NotImplementedError

    def read(self, info: "CheckpointInfo", rank: int, world: int, **options: Any) -> Dict[str, torch.Tensor]:
        """Rank `rank` of `world`'s slices of the checkpoint `peek` described (its headers are not read again):
        `_Read.of`'s options."""
        raise NotImplementedError

    def load(self, found: Files, rank: int, world: int, check: "Check", **options: Any
             ) -> Dict[str, torch.Tensor]:
        """`peek`, `check(arch, vocab_rows)` (the caller's: a ValueError stops the load), then `read`."""
        raise NotImplementedError

    def load_rank_state(self, shards: Sequence[PathLike], rank: int, world: int, **options: Any
                        ) -> Dict[str, torch.Tensor]:
        """`read` from the files alone (`read`'s options)."""
        if not shards:
            raise ValueError(f"no {self.layout} checkpoint files given")
        return self.read(self.info_of([Path(p) for p in shards]), rank, world, **options)


Check = Callable[[ArchSpec, int], None]  # what a loader checks of the headers: the files' options, embedding rows


@dataclass(frozen=True)
class _Read:
    """How `Reader.read` was asked to read (its keyword arguments)."""

    dtype: Optional[torch.dtype]
    device: Union[str, torch.device]
    mmap: bool
    progress: Optional[Progress]
    scheme: Optional[quant.Scheme]
    started: float

    @classmethod
    def of(cls, rank: int, world: int, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
           mmap: bool = True, progress: Optional[Progress] = None, scheme: Optional[quant.Scheme] = None) -> "_Read":
        """The options of a read by rank `rank` of `world` (a ValueError when that is no valid position)."""
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"rank {rank!r} of {world!r} processes is not a valid position")
        return cls(dtype, device, mmap, progress, scheme, time.perf_counter())

    def seconds(self) -> float:
        return time.perf_counter() - self.started


_BIAS_KEYS = {"attention_bias": "layers.0.attention.wq.bias", "mlp_bias": "layers.0.feed_forward.w1.bias"}


class MetaReader(Reader):
    """Meta's layout: consolidated.NN.pth shards beside params.json."""

    layout, marker = "meta", "params.json"

    def peek(self, found: Files) -> CheckpointInfo:
        """The first shard's tensors (memory-mapped: reading shapes touches no weights): the embedding rows, a
        stored output weight or not (tied), the biases."""
        first = open_shard(found.files[0])
        if "tok_embeddings.weight" not in first:
            raise ValueError(f"{str(found.files[0])!r} has no tok_embeddings.weight: not a Llama checkpoint")
        arch = ArchSpec(**{option: key in first for option, key in _BIAS_KEYS.items()})
        return CheckpointInfo(list(found.files), dict(found.params), first["tok_embeddings.weight"].shape[0],
                              found.quantization, tied="output.weight" not in first, arch=arch)

    def info_of(self, files: List[Path]) -> CheckpointInfo:
        return CheckpointInfo(files, {}, 0)  # reading Meta's shards needs no header

    def load(self, found: Files, rank: int, world: int, check: Check, **options: Any) -> Dict[str, torch.Tensor]:
        info = self.peek(found)
        check(info.arch, info.vocab_rows)
        return self.read(info, rank, world, **options)

    def read(self, info: CheckpointInfo, rank: int, world: int, **options: Any) -> Dict[str, torch.Tensor]:
        """Shards are memory-mapped. With as many shards as processes the rank's own shard is used as is (on CPU
        in the stored dtype no byte is copied); otherwise only the shards overlapping this rank's share are
        opened, one at a time, and only the slices this rank needs are copied out, so memory stays near this
        rank's share plus one shard's mapping. The caller checks `world` against the model's heads first
        (check_model_parallel_size): here only the split dimensions' sizes are checked."""
        how = _Read.of(rank, world, **options)
        files, dtype, device = [Path(p) for p in info.shards], how.dtype, how.device
        if len(files) == world:
            state = open_shard(files[rank], mmap=how.mmap)
            state = {k: v.to(device=device, dtype=_cast_to(v, dtype)) for k, v in state.items()}
            if "output.weight" not in state:
                state["output.weight"] = tied_output(files, rank, world, dtype, device)
            if how.progress:
                how.progress(1, 1, files[rank], how.seconds())
            return state
        out = self._gather(files, rank, world, how)
        if "output.weight" not in out:
            out["output.weight"] = tied_output(files, rank, world, dtype, device)
        return out

    @staticmethod
    def _gather(files: List[Path], rank: int, world: int, how: _Read) -> Dict[str, torch.Tensor]:
        """This rank's slices, copied out of the shards that overlap them, one shard at a time."""
        n_src = len(files)
        out: Dict[str, torch.Tensor] = {}
        reference: Optional[Dict[str, torch.Size]] = None  # keys and piece shapes of the first shard opened
        needed = shards_for_rank(n_src, rank, world)
        for done, src_index in enumerate(needed, start=1):
            path = files[src_index]
            src = open_shard(path)
            shapes = {k: v.shape for k, v in src.items()}
            if reference is None:
                reference, ref_path = shapes, path
            elif shapes != reference:
                diff = sorted(set(shapes) ^ set(reference)) or sorted(k for k in shapes if shapes[k] != reference[k])
                raise ValueError(f"shards {ref_path.name} and {path.name} of the same checkpoint do not hold the "
                                 f"same entries with the same shapes (first differences: {diff[:5]})")
            for key, piece in src.items():
                _copy_slice(out, key, piece, path, n_src, src_index, rank, world, how)
            piece = None
            del src  # drop every reference into this shard's mapping before the next one is opened
            if how.progress:
                how.progress(done, len(needed), path, how.seconds())
        return out


def _copy_slice(out: Dict[str, torch.Tensor], key: str, piece: torch.Tensor, path: Path, n_src: int,
                src_index: int, rank: int, world: int, how: _Read) -> None:
    """Copy the part of shard `src_index`'s `piece` of entry `key` that rank `rank` wants into out[key]."""
    dim = split_dim(key, piece.dim(), how.scheme)
    if dim is None:
        if key not in out:
            out[key] = piece.to(device=how.device, dtype=_cast_to(piece, how.dtype), copy=True)
        return
    if dim >= piece.dim():
        raise ValueError(f"{key} in {str(path)!r} has shape {tuple(piece.shape)}: no dim {dim} to split")
    full = piece.shape[dim] * n_src
    if full % world:
        raise ValueError(f"{key} has {full} entries on dim {dim}, not divisible by {world} processes")
    want, have = _piece_bounds(full, world, rank), _piece_bounds(full, n_src, src_index)
    lo, hi = max(want.start, have.start), min(want.stop, have.stop)
    if lo >= hi:
        return
    if key not in out:
        shape = list(piece.shape)
        shape[dim] = len(want)
        out[key] = torch.empty(shape, dtype=_cast_to(piece, how.dtype), device=how.device)
    out[key].narrow(dim, lo - want.start, hi - lo).copy_(piece.narrow(dim, lo - have.start, hi - lo))


READER = MetaReader()
READERS[READER.layout] = READER


def inspect_checkpoint(ckpt_dir: PathLike) -> CheckpointInfo:
    """What Meta's layout in `ckpt_dir` holds, from its headers (`MetaReader.inspect`)."""
    return READER.inspect(ckpt_dir)


def load_rank_state(shards: Sequence[PathLike], rank: int, world: int, **options: Any) -> Dict[str, torch.Tensor]:
    """Rank `rank` of `world`'s slices of Meta's shards (`Reader.load_rank_state`'s options)."""
    return READER.load_rank_state(shards, rank, world, **options)


def _piece_bounds(full: int, parts: int, index: int) -> range:
    size = full // parts
    return range(index * size, (index + 1) * size)


def shards_for_rank(n_shards: int, rank: int, world: int) -> List[int]:
    """The shards whose slices rank `rank` of `world` needs.

    Every split entry is cut into equal pieces, so shard s holds the fraction [s/S, (s+1)/S) of each and rank r
    wants [r/M, (r+1)/M): the same shards for every entry. Replicated entries come from the first of them.
    """
    return [s for s in range(n_shards) if s * world < (rank + 1) * n_shards and rank * n_shards < (s + 1) * world]


def tied_output(shards: Sequence[PathLike], rank: int, world: int, dtype: Optional[torch.dtype] = None,
                device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Rank `rank`'s slice of the output projection of a checkpoint that stores none (tied embeddings): the
    output is split on its vocabulary rows, the embedding across shards on its columns, so the rank's rows are
    read from every shard and joined."""
    out_dim, emb_dim = split_dim("output.weight"), split_dim("tok_embeddings.weight")
    pieces = []
    for path in shards:
        table = open_shard(path)["tok_embeddings.weight"]
        rows = _piece_bounds(table.shape[out_dim], world, rank)
        pieces.append(table.narrow(out_dim, rows.start, len(rows)).to(device=device, dtype=_cast_to(table, dtype),
                                                                       copy=True))
        del table
    return torch.cat(pieces, dim=emb_dim) if len(pieces) > 1 else pieces[0]


def _cast_to(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """`dtype` applies to floating-point entries; integer ones (quantized weights) keep theirs."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
