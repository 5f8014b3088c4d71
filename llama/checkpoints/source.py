"""A checkpoint folder as one object: its layout (Meta's or Hugging Face's, quantized or not), its shards, its
params, the model its weights make, its quantization scheme, and each process's slices of it.

`Checkpoint.open` reads only headers (params.json or config.json, the shards' tensor shapes) and checks them
once; everything that reads a checkpoint to build, reshard or quantize a model starts from it. What the weights
are (`args`: params.json's hyper-parameters with the vocabulary taken from the embedding rows) is kept apart
from how a run uses them: `run_args` adds a run's max_seq_len and max_batch_size for the model it builds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from . import checkpoint, hf
from .. import quant
from .checkpoint import CheckpointInfo
from ..model.transformer import ModelArgs

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder, opened: see the module's docstring. Build with `Checkpoint.open`."""

    folder: str
    layout: str  # "meta" (consolidated.NN.pth + params.json) or "hf" (config.json + safetensors): for messages
    info: CheckpointInfo
    scheme: Optional[quant.Scheme]  # the stored weights' quantization (params.json's entry), None for float ones
    _args: ModelArgs
    reader: checkpoint.Reader  # its layout's

    @classmethod
    def open(cls, ckpt_dir: PathLike) -> "Checkpoint":
        """Read the folder's headers: FileNotFoundError / ValueError naming what is missing or malformed."""
        # Meta's layout when params.json is there, else Hugging Face's when config.json is, else Meta's (whose
        # inspect names what is missing)
        meta = checkpoint.READER
        reader = hf.READER if not meta.claims(ckpt_dir) and hf.READER.claims(ckpt_dir) else meta
        info = reader.inspect(ckpt_dir)
        scheme = None if info.quantization is None else quant.from_entry(info.quantization, "params.json")
        args = ModelArgs.from_params(info.params, arch=info.arch)
        if args.vocab_size == -1:  # Meta's files say -1: the embedding rows are the vocabulary
            args = replace(args, vocab_size=info.vocab_rows)
        return cls(str(ckpt_dir), reader.layout, info, scheme, args, reader)

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
        checkpoint.check_model_parallel_size(self._args, world)

    def valid_worlds(self) -> List[int]:
        return checkpoint.valid_model_parallel_sizes(self._args)

    def load_rank_state(self, rank: int, world: int, **kwargs: Any) -> Dict[str, torch.Tensor]:
        """Rank `rank` of `world`'s slices of every stored tensor, in Meta's names (the layout's reader's
        `load_rank_state`; a quantized checkpoint's entries are sliced as its scheme says)."""
        return self.reader.read(self.info, rank, world, scheme=self.scheme, **kwargs)
