"""Writing Meta's layout: shards split as layout.py says, written atomically, params.json last, never over
another checkpoint (nor over the remains of an interrupted write)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Union

import torch

from .layout import split_dim

PathLike = Union[str, os.PathLike]


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
