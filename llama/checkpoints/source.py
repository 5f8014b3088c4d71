"""A checkpoint folder as one object: what is on disk (`describe`: its layout, Meta's or Hugging Face's, its weight
files, its params, a chat template), then, with its weights' headers read (`Checkpoint.open`), the model its
weights make, its quantization scheme and each process's slices of it.

`describe` reads the folder's small files only: params.json, or config.json (converted to Meta's params through
hf_config and the family's Hugging Face spec), and a Hugging Face checkpoint's chat template. The weights'
headers (shapes, biases, the embedding rows) are the layout's reader's (checkpoint.py, hf.py): `Checkpoint.open`
reads them at once, for the programs that rewrite checkpoints; `Llama.build` lets the reader read them just
before the weights (checkpoints/loading.py), so that a load visits each module once. What the weights are
(`args`: params.json's hyper-parameters with the vocabulary taken from the embedding rows) is kept apart from how
a run uses them: `run_args` adds a run's max_seq_len and max_batch_size for the model it builds.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import torch

from . import hf_config
from .. import quant
from ..families.base import HFSpec
from .layout import check_model_parallel_size, valid_model_parallel_sizes
from ..model.args import ArchSpec, ModelArgs

if TYPE_CHECKING:
    from .checkpoint import CheckpointInfo, Reader

PathLike = Union[str, os.PathLike]
_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
PARAMS, CONFIG = "params.json", "config.json"
INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


# --- the folder's files ------------------------------------------------------------------------------------


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


def find_weight_files(ckpt_dir: PathLike) -> List[Path]:
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
    return read_json_object(ckpt_dir, PARAMS)


def read_config(ckpt_dir: PathLike) -> Dict[str, Any]:
    """config.json of a Hugging Face directory, as a dict (errors name the file)."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(folder)!r} does not exist")
    return read_json_object(folder, CONFIG)


def chat_template(folder: Optional[PathLike]) -> Optional[Tuple[str, str]]:
    """A Hugging Face checkpoint's own template and where it was found: chat_template.jinja, or
    tokenizer_config.json's `chat_template` (a string, or a list of {name, template}: the one named 'default').
    None when it has none."""
    if folder is None:
        return None
    root = Path(folder)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8"), "the checkpoint's chat_template.jinja"
    config = root / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except ValueError as err:
        raise ValueError(f"{str(config)!r} is not valid JSON: {err}") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template.strip():
        return template, "the checkpoint's tokenizer_config.json chat_template"
    return None


def layout_of(ckpt_dir: PathLike) -> str:
    """"meta" when params.json is there, else "hf" when config.json is, else "meta" (whose files' absence the
    errors then name)."""
    folder = Path(ckpt_dir)
    return "hf" if not (folder / PARAMS).exists() and (folder / CONFIG).is_file() else "meta"


READERS: Dict[str, "Reader"] = {}  # layout -> its reader; checkpoint.py and hf.py add theirs (they import this)


def reader_for(layout: str) -> "Reader":
    """The reader of a layout ("meta": checkpoint.py's, "hf": hf.py's)."""
    return READERS[layout]


# --- what is on disk ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    """What a checkpoint folder holds, from its small files alone (`describe`): no weight header is read."""

    folder: str
    layout: str  # "meta" (consolidated.NN.pth + params.json) or "hf" (config.json + safetensors): for messages
    files: List[Path]  # the shards (Meta) or the safetensors files (Hugging Face), in order
    params: Dict[str, Any]  # Meta's hyper-parameters (config.json's converted), without the quantization entry
    quantization: Optional[Dict[str, Any]]  # params.json's "quantization" entry (llama.quantize wrote it)
    reader: "Reader"  # its layout's
    scheme: Optional[quant.Scheme] = None  # the quantization entry's scheme, None for float weights
    template: Optional[Tuple[str, str]] = None  # a Hugging Face checkpoint's chat template, and where it was
    # Hugging Face's layout says these in config.json; Meta's in the shards' keys (None here: the reader's peek)
    arch: Optional[ArchSpec] = None
    tied: Optional[bool] = None
    spec: Optional[HFSpec] = None

    @property
    def n_shards(self) -> int:
        return len(self.files)


def describe(ckpt_dir: PathLike, layout: Optional[str] = None) -> Files:
    """The folder's layout (`layout_of`, unless given), weight files and params (FileNotFoundError / ValueError
    naming what is missing or malformed), read in one pass, config.json's conversion last."""
    folder, layout = str(ckpt_dir), layout or layout_of(ckpt_dir)
    if layout == "meta":
        shards = find_shards(folder)
        params = read_params(folder)
        quantization = params.pop("quantization", None)  # not a model hyper-parameter: kept apart from ModelArgs
        scheme = None if quantization is None else quant.from_entry(quantization, PARAMS)
        return Files(folder, layout, shards, params, quantization, reader_for(layout), scheme, chat_template(folder))
    files = find_weight_files(folder)
    template = chat_template(folder)
    config = read_config(folder)
    try:  # the conversion answers about config.json's contents; the file is named here, where it was read
        spec, arch, params = hf_config.from_config(config)
    except ValueError as err:
        raise ValueError(f"{Path(folder) / CONFIG}: {err}") from None
    return Files(folder, layout, files, params, None, reader_for(layout), None, template, arch,
                 hf_config.tied(config), spec)


def with_files(found: Files, files: List[Path]) -> Files:
    """`found` for a subset of its weight files (the programs that read some files of a folder)."""
    return replace(found, files=list(files))


# --- opened: headers read ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder, opened: see the module's docstring. Build with `Checkpoint.open`."""

    folder: str
    layout: str  # "meta" or "hf": for messages
    info: "CheckpointInfo"
    scheme: Optional[quant.Scheme]  # the stored weights' quantization (params.json's entry), None for float ones
    _args: ModelArgs
    reader: "Reader"  # its layout's

    @classmethod
    def open(cls, ckpt_dir: PathLike) -> "Checkpoint":
        """Read the folder's headers: FileNotFoundError / ValueError naming what is missing or malformed."""
        found = describe(ckpt_dir)
        info = found.reader.peek(found)
        return cls(found.folder, found.layout, info, found.scheme, weights_args(info), found.reader)

    @property
    def args(self) -> ModelArgs:
        """What the weights are (a copy: the checkpoint's own stays as read). max_seq_len and max_batch_size
        are ModelArgs' defaults here, not a run's: see `run_args`."""
        return replace(self._args)

    def run_args(self, max_seq_len: int, max_batch_size: int) -> ModelArgs:
        """The model's ModelArgs for a run of these sizes (checked)."""
        args = replace(self._args, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        args.validate()
        return args

    @property
    def params(self) -> Dict[str, Any]:
        """params.json's hyper-parameters (Meta's names; for Hugging Face's layout, converted from config.json)
        without the quantization entry."""
        return dict(self.info.params)

    @property
    def shards(self) -> List[Path]:
        return list(self.info.shards)

    @property
    def n_shards(self) -> int:
        return self.info.n_shards

    @property
    def quantization(self) -> Optional[Dict[str, Any]]:
        """params.json's "quantization" entry as stored (None for float weights)."""
        return self.info.quantization

    def check_world(self, world: int) -> None:
        """A ValueError, naming the valid counts, when `world` processes cannot share this model."""
        check_model_parallel_size(self._args, world)

    def valid_worlds(self) -> List[int]:
        return valid_model_parallel_sizes(self._args)

    def load_rank_state(self, rank: int, world: int, **kwargs: Any) -> Dict[str, torch.Tensor]:
        """Rank `rank` of `world`'s slices of every stored tensor, in Meta's names (the layout's reader's
        `read`; a quantized checkpoint's entries are sliced as its scheme says)."""
        return self.reader.read(self.info, rank, world, scheme=self.scheme, **kwargs)


def weights_args(info: "CheckpointInfo") -> ModelArgs:
    """What the weights are: params.json's hyper-parameters, the vocabulary from the embedding rows when the
    file says -1 (as Meta's do), the architecture options from the files."""
    args = ModelArgs.from_params(info.params, arch=info.arch)
    return replace(args, vocab_size=info.vocab_rows) if args.vocab_size == -1 else args
