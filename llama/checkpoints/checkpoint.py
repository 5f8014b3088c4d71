"""Meta's checkpoint layout: ``consolidated.NN.pth`` shards plus ``params.json``.

This is the one module that knows how weights are split. A column-parallel weight (wq, wk, wv, w1, w3, output)
is split on dim 0, a row-parallel one (wo, w2, tok_embeddings) on dim 1, everything else (norms, rope.freqs) is
copied into every shard. From that table it gives any of M processes its slice of a checkpoint of S shards, and
writes checkpoints of any shard count (resharding, test fixtures).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..model import layers
from .. import quant
from ..model.transformer import ModelArgs, Transformer

_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
PathLike = Union[str, os.PathLike]


# --- the model's parameters: shapes and split dims, in one place ---------------------------------------------


@dataclass(frozen=True)
class ModelLayout:
    """Every parameter of one model shape: its full (unsplit) shape and the dim it is split on across processes,
    read once off a Transformer built on the meta device (the layers declare their split dims). The one place
    that learns shapes from the model: checkpoints, conversion, LoRA and quantization all ask it."""

    shapes: Dict[str, Tuple[int, ...]]  # the full state dict in Meta's names and the released files' order
    split_dims: Dict[str, Optional[int]]  # each entry's split dim, None where every process holds all of it
    linear: Tuple[str, ...]  # the linear layers as checkpoints store them (wq ... w3, output)
    fused: Dict[str, Tuple[Tuple[int, int], int]]  # the linear layers as the prepared model runs them (wq/wk/wv
    # and w1/w3 fused): full (out, in) and split dim

    def fused_shapes(self, world: int) -> Dict[str, Tuple[int, int]]:
        """Each linear layer's (out, in) on one of `world` processes, as the prepared model runs them."""
        out = {}
        for name, (shape, dim) in self.fused.items():
            piece = list(shape)
            piece[dim] //= world
            out[name] = (piece[0], piece[1])
        return out


_SIZE_ONLY = ("max_seq_len", "max_batch_size")  # a run's settings: they change no parameter's shape


def model_layout(args: ModelArgs) -> ModelLayout:
    """The layout of the model `args` describe (cached per shape; max_seq_len and max_batch_size do not count)."""
    if args.vocab_size < 1:
        raise ValueError("a model's layout needs a concrete vocab_size (the checkpoint's embedding rows)")
    return _layout(tuple((f.name, getattr(args, f.name)) for f in fields(args) if f.name not in _SIZE_ONLY))


@functools.lru_cache(maxsize=16)
def _layout(key: Tuple[Tuple[str, Any], ...]) -> ModelLayout:
    args = ModelArgs(**dict(key))
    with torch.device("meta"), layers.single_process():
        model = Transformer(args)
    modules = dict(model.named_modules())
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    shapes["rope.freqs"] = (args.head_dim // 2,)
    split = {k: getattr(modules.get(k.rpartition(".")[0]), "split_dim", None) for k in shapes}
    linear = tuple(name for name, m in modules.items() if isinstance(m, layers.ParallelLinear))
    model.prepare()  # fuse, as the run does
    fused = {name: ((m.out_features, m.in_features), m.split_dim) for name, m in model.named_modules()
             if isinstance(m, layers.ParallelLinear)}
    return ModelLayout(shapes, split, linear, fused)


@functools.lru_cache(maxsize=None)
def _split_dims() -> Dict[str, int]:
    """Module name (wq, w2, tok_embeddings...) -> split dim, as the model's parallel layers declare it."""
    layout = model_layout(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=8, multiple_of=8))
    return {key.split(".")[-2]: dim for key, dim in layout.split_dims.items() if dim is not None}


def split_dim(key: str, ndim: Optional[int] = None, scheme: Optional[quant.Scheme] = None) -> Optional[int]:
    """The dim a state-dict entry is split on across shards, None where every shard holds all of it.

    A quantized layer's entries other than its codes (`<layer>.scales`, `.zeros`) split as its scheme says
    (`Scheme.entry_split_dim`, given the entry's `ndim`): like the weight, except a per-output-row vector
    (int8's scales) of a layer split on its input dim, which every shard holds whole. Without a scheme, the
    rule every scheme here follows."""
    parts = key.split(".")
    dim = _split_dims().get(parts[-2]) if len(parts) >= 2 else None
    if dim is None or ndim is None or parts[-1] == "weight":
        return dim
    return (scheme or quant.Scheme).entry_split_dim(parts[-1], dim, ndim)


# --- reading -----------------------------------------------------------------------------------------------


def find_shards(ckpt_dir: PathLike) -> List[Path]:
    """consolidated.00.pth ... in order; errors if the folder or the shards are missing or not numbered 0..S-1."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(folder)!r} does not exist")
    found = {}
    for path in folder.glob("*.pth"):
        match = _SHARD_NAME.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise FileNotFoundError(f"no consolidated.NN.pth checkpoint files in {str(folder)!r}")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"checkpoint shards in {str(folder)!r} are not numbered 00..{len(found) - 1:02d}: "
                         f"found {[found[i].name for i in sorted(found)]}")
    return [found[i] for i in range(len(found))]


def read_json_object(folder: PathLike, name: str) -> Dict[str, Any]:
    """The JSON object in folder/name (params.json, config.json, adapter_config.json); errors name the file."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{name} not found in {str(Path(folder))!r}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(value).__name__}")
    return value


def read_params(ckpt_dir: PathLike) -> Dict[str, Any]:
    return read_json_object(ckpt_dir, "params.json")


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

    @property
    def n_shards(self) -> int:
        return len(self.shards)


def inspect_checkpoint(ckpt_dir: PathLike) -> CheckpointInfo:
    shards = find_shards(ckpt_dir)
    params = read_params(ckpt_dir)
    quantization = params.pop("quantization", None)  # not a model hyper-parameter: kept apart from ModelArgs
    first = open_shard(shards[0])  # memory-mapped: reading shapes touches no weights
    if "tok_embeddings.weight" not in first:
        raise ValueError(f"{str(shards[0])!r} has no tok_embeddings.weight: not a Llama checkpoint")
    return CheckpointInfo(shards, params, first["tok_embeddings.weight"].shape[0], quantization,
                          tied="output.weight" not in first)


def valid_model_parallel_sizes(args: ModelArgs) -> List[int]:
    """Process counts M that split every split dimension of this model evenly (heads, KV heads, dim, FFN, vocab).

    M must divide the KV heads, so none above them is ever valid. Llama 2 7B: 1, 2, 4, 8, 16, 32; 13B: 1, 2, 4, 8
    (its FFN, 13824, has no factor 16); 70B (8 KV heads): 1, 2, 4, 8.
    """
    if args.vocab_size < 1:
        raise ValueError("valid_model_parallel_sizes needs a concrete vocab_size (the checkpoint's embedding rows)")
    sizes = (args.n_heads, args.kv_heads, args.dim, args.ffn_hidden_dim, args.vocab_size)
    return [m for m in range(1, args.kv_heads + 1) if all(size % m == 0 for size in sizes)]


def check_model_parallel_size(args: ModelArgs, world: int) -> None:
    """A clear error, naming the valid values, when `world` processes cannot share this model."""
    valid = valid_model_parallel_sizes(args)
    if world not in valid:
        raise ValueError(f"this checkpoint cannot be split over {world} model-parallel processes "
                         f"({args.n_heads} heads, {args.kv_heads} KV heads, dim {args.dim}, "
                         f"FFN {args.ffn_hidden_dim}, vocab {args.vocab_size} must all divide evenly); "
                         f"valid process counts: {valid}")


def _piece_bounds(full: int, parts: int, index: int) -> range:
    size = full // parts
    return range(index * size, (index + 1) * size)


def shards_for_rank(n_shards: int, rank: int, world: int) -> List[int]:
    """The shards whose slices rank `rank` of `world` needs.

    Every split entry is cut into equal pieces, so shard s holds the fraction [s/S, (s+1)/S) of each and rank r
    wants [r/M, (r+1)/M): the same shards for every entry. Replicated entries come from the first of them.
    """
    return [s for s in range(n_shards) if s * world < (rank + 1) * n_shards and rank * n_shards < (s + 1) * world]


def load_rank_state(
    shards: Sequence[PathLike],
    rank: int,
    world: int,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    mmap: bool = True,
    progress: Optional[Callable[[int, int, Path, float], None]] = None,
    scheme: Optional[quant.Scheme] = None,
) -> Dict[str, torch.Tensor]:
    """The tensors rank `rank` of `world` processes needs, from a checkpoint of any number of shards.

    Shards are memory-mapped. With as many shards as processes the rank's own shard is used as is (on CPU in
    the stored dtype no byte is copied); otherwise only the shards overlapping this rank's share are opened,
    one at a time, and only the slices this rank needs are copied out, so memory stays near this rank's share
    plus one shard's mapping. The caller checks `world` against the model's heads first
    (check_model_parallel_size): here only the split dimensions' sizes are checked. mmap=False reads the
    rank's own shard into one buffer per tensor instead, so that a caller replacing tensors one by one (weight
    packing) frees each as it goes, which a shared mapping would not. `progress(i, n, path, seconds)` is called
    after each of the n shards this rank reads. `scheme`: a quantized checkpoint's, which slices its entries.
    """
    if not shards:
        raise ValueError("no checkpoint shards given")
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"rank {rank!r} of {world!r} processes is not a valid position")
    started = time.perf_counter()
    if len(shards) == world:
        state = open_shard(shards[rank], mmap=mmap)
        state = {k: v.to(device=device, dtype=_cast_to(v, dtype)) for k, v in state.items()}
        if "output.weight" not in state:
            state["output.weight"] = tied_output(shards, rank, world, dtype, device)
        if progress:
            progress(1, 1, Path(shards[rank]), time.perf_counter() - started)
        return state

    n_src = len(shards)
    out: Dict[str, torch.Tensor] = {}
    reference: Optional[Dict[str, torch.Size]] = None  # keys and piece shapes of the first shard opened
    needed = shards_for_rank(n_src, rank, world)
    for done, src_index in enumerate(needed, start=1):
        path = shards[src_index]
        src = open_shard(path)
        shapes = {k: v.shape for k, v in src.items()}
        if reference is None:
            reference, ref_path = shapes, path
        elif shapes != reference:
            diff = sorted(set(shapes) ^ set(reference)) or sorted(k for k in shapes if shapes[k] != reference[k])
            raise ValueError(f"shards {Path(ref_path).name} and {Path(path).name} of the same checkpoint do not "
                             f"hold the same entries with the same shapes (first differences: {diff[:5]})")
        for key, piece in src.items():
            dim = split_dim(key, piece.dim(), scheme)
            if dim is None:
                if key not in out:
                    out[key] = piece.to(device=device, dtype=_cast_to(piece, dtype), copy=True)
                continue
            if dim >= piece.dim():
                raise ValueError(f"{key} in {str(path)!r} has shape {tuple(piece.shape)}: no dim {dim} to split")
            full = piece.shape[dim] * n_src
            if full % world:
                raise ValueError(f"{key} has {full} entries on dim {dim}, not divisible by {world} processes")
            want, have = _piece_bounds(full, world, rank), _piece_bounds(full, n_src, src_index)
            lo, hi = max(want.start, have.start), min(want.stop, have.stop)
            if lo >= hi:
                continue
            if key not in out:
                shape = list(piece.shape)
                shape[dim] = len(want)
                out[key] = torch.empty(shape, dtype=_cast_to(piece, dtype), device=device)
            out[key].narrow(dim, lo - want.start, hi - lo).copy_(piece.narrow(dim, lo - have.start, hi - lo))
        piece = None
        del src  # drop every reference into this shard's mapping before the next one is opened
        if progress:
            progress(done, len(needed), Path(path), time.perf_counter() - started)
    if "output.weight" not in out:
        out["output.weight"] = tied_output(shards, rank, world, dtype, device)
    return out


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


# --- writing -----------------------------------------------------------------------------------------------


def split_state(state: Dict[str, torch.Tensor], n_shards: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Meta-layout shards of a full (unsplit) state dict, one at a time."""
    for index in range(n_shards):
        shard = {}
        for key, tensor in state.items():
            dim = split_dim(key, tensor.dim())
            if dim is None:
                shard[key] = tensor.clone()
            else:
                if tensor.shape[dim] % n_shards:
                    raise ValueError(f"{key} ({tensor.shape[dim]} on dim {dim}) cannot be split in {n_shards} shards")
                shard[key] = tensor.chunk(n_shards, dim=dim)[index].clone()
        yield shard


def atomic_save(obj: Any, path: PathLike) -> None:
    """Write through a temporary file in the same folder, so no half-written file ever has the final name.

    `obj`: bytes (written as they are), a dict or list for a .json path, a callable that writes the file's
    bytes itself into the binary handle it is given (a file streamed piece by piece, such as safetensors), else
    anything torch.save takes. The data is flushed to disk before the rename, so after a crash the final name
    holds the whole file or nothing.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            if isinstance(obj, (bytes, bytearray)):
                handle.write(obj)
            elif callable(obj) and not isinstance(obj, torch.nn.Module):
                obj(handle)
            elif isinstance(obj, (dict, list)) and path.suffix == ".json":
                handle.write((json.dumps(obj, indent=2) + "\n").encode())
            else:
                torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ensure_empty_destination(folder: PathLike) -> Path:
    """A checkpoint is never written over another one (nor over the remains of an interrupted write)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{str(folder)!r} exists and is not a directory")
    shards = sorted(p.name for p in folder.glob("*.pth"))
    has_params = (folder / "params.json").exists()
    if shards and not has_params:
        raise FileExistsError(f"{str(folder)!r} holds checkpoint shards ({shards}) but no params.json: an "
                              "incomplete checkpoint, probably from an interrupted write; refusing to overwrite "
                              "it: delete it yourself or choose an empty or new directory")
    if shards or has_params:
        raise FileExistsError(f"{str(folder)!r} already holds a checkpoint ({shards + ['params.json'] * has_params});"
                              " refusing to overwrite it: choose an empty or new directory")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_checkpoint(folder: PathLike, params: Union[Dict[str, Any], bytes],
                     shards: Iterable[Dict[str, torch.Tensor]]) -> Path:
    """Write shards (in order) and params.json into an empty folder; params.json goes last.

    `params`: a mapping (written as JSON) or the bytes of a params.json to copy verbatim. Each shard is taken
    from the iterable, written and dropped before the next is asked for. If writing fails (an error, Ctrl-C)
    the shards this call wrote are removed again; after a hard kill, complete shards and no params.json remain,
    which ensure_empty_destination recognises as an interrupted write.
    """
    folder = ensure_empty_destination(folder)
    written: List[Path] = []
    try:
        # Not enumerate(): its reused result tuple would keep the previous shard alive while the next is built.
        for shard in shards:
            path = folder / f"consolidated.{len(written):02d}.pth"
            written.append(path)
            atomic_save(shard, path)
            del shard
        atomic_save(params if isinstance(params, (bytes, bytearray)) else dict(params), folder / "params.json")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return folder


def state_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Every entry of a full (unsplit) state dict in Meta's naming, with its shape, in the released files' order
    (read off the model itself: `model_layout`)."""
    if args.vocab_size < 1:
        raise ValueError("state_shapes needs a concrete vocab_size (the checkpoint's embedding rows)")
    return dict(model_layout(args).shapes)


def rope_freqs(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The `rope.freqs` entry of Meta's shards: the rotary inverse frequencies (the model recomputes its own)."""
    return (1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))).to(dtype)


def random_state(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Dict[str, torch.Tensor]:
    """A full (unsplit) random state dict in Meta's naming, for tests and benchmarks.

    Weights are scaled like a trained model's (rows of unit-ish output variance), so activations stay sane and
    greedy decoding is not dominated by ties.
    """
    if args.vocab_size < 1:
        raise ValueError("random_state needs a concrete vocab_size")
    gen = torch.Generator().manual_seed(seed)
    state: Dict[str, torch.Tensor] = {}
    for key, shape in state_shapes(args).items():
        if key == "tok_embeddings.weight":
            state[key] = torch.randn(shape, generator=gen).to(dtype)
        elif key == "rope.freqs":
            state[key] = rope_freqs(args, dtype)
        elif len(shape) == 1:  # norms
            state[key] = (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        else:
            state[key] = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(dtype)
    return state
